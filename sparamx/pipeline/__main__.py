"""``python -m sparamx.pipeline CONFIG``: the pipeline (:mod:`sparamx.pipeline.runner`)."""

from .runner import cli

if __name__ == "__main__":
    cli()
