// Which kernel each native path uses now (for kernel_info): the linear paths are chosen
// in ops.cpp; these report the others.
#pragma once

namespace sparamx {

const char* norm_kernel_name();       // norm_ops.cpp
const char* attention_kernel_name();  // attention_ops.cpp

}  // namespace sparamx
