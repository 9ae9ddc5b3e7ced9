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

// Checks that every value of an int[2] argument is positive (or, with
// zero_allowed, non-negative).
inline void check_positive(const char* op, const char* name, c10::IntArrayRef values,
                           bool zero_allowed = false) {
  const int64_t least = zero_allowed ? 0 : 1;
  TORCH_CHECK(values[0] >= least && values[1] >= least, op, ": ", name,
              zero_allowed ? " must be non-negative" : " must be positive", ", but got ", name,
              "=", values);
}

}  // namespace pyconvext
