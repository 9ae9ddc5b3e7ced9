#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace pyconvext {

// Checks that an int[2] argument has two values (the dispatcher passes any
// list through).
inline void check_pair(const char* op, const char* name, c10::IntArrayRef values) {
  TORCH_CHECK(values.size() == 2, op, ": expected ", name,
              " to be a single integer or a list of 2 integers, but got ", name, "=", values);
}

}  // namespace pyconvext
