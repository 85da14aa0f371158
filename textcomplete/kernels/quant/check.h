// Argument checks of the kernels: a failed check throws tcq::Error (a std::runtime_error, which Python sees
// as RuntimeError through pybind11 and the library without torch returns as its message).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tcq {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw Error(message.str());
}

}  // namespace tcq

#define TCQ_CHECK(condition, ...)                  \
  do {                                             \
    if (!(condition)) ::tcq::fail(__VA_ARGS__);    \
  } while (false)
