"""The OpenAI-compatible server: ``engine`` (one decode worker thread behind a bounded
queue) and ``app`` (the FastAPI app and its command). ``python -m sparamx.serve
ARTIFACT`` runs it (``sparamx serve``).
"""
