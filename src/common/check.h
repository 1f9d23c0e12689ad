// Host-side argument checking shared by every op: FP8FLOW_CHECK and the validators that build
// "fp8flow::<op>: <arg>: expected <x>, got <y>" messages. Checks run before any launch, never in
// kernels.
#pragma once

#include <charconv>
#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>

#include "fp8flow/types.h"

namespace fp8flow::detail {

[[noreturn]] void throw_error(ErrorKind kind, const std::string& msg);

namespace cat_detail {
// Arguments cat() formats without an ostringstream: text and integers (not char, not bool, whose
// stream forms differ); anything else (floats, enums with operator<<, manipulators) sends the
// whole call through the stream, so the output is always exactly the stream's.
template <typename T>
constexpr bool fast_v = std::is_convertible_v<const T&, std::string_view> ||
                        (std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                         !std::is_same_v<T, char> && !std::is_same_v<T, signed char> &&
                         !std::is_same_v<T, unsigned char>);

// Appends v to buf[n, cap); ok turns false (and nothing more is written) when it does not fit.
template <typename T>
void put(char* buf, size_t cap, size_t& n, bool& ok, const T& v) {
  if (!ok) return;
  if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    const std::string_view sv(v);
    if (sv.size() > cap - n) {
      ok = false;
      return;
    }
    std::char_traits<char>::copy(buf + n, sv.data(), sv.size());
    n += sv.size();
  } else {
    const auto r = std::to_chars(buf + n, buf + cap, v);
    if (r.ec != std::errc()) {
      ok = false;
      return;
    }
    n = static_cast<size_t>(r.ptr - buf);
  }
}
}  // namespace cat_detail

// The arguments' stream forms, concatenated. Validation messages are built with it (often on the
// success path too), so text and integers take a fast path (no ostringstream: ~10x cheaper).
template <typename... A>
std::string cat(const A&... a) {
  if constexpr ((cat_detail::fast_v<A> && ...)) {
    char buf[256];
    size_t n = 0;
    bool ok = true;
    (cat_detail::put(buf, sizeof buf, n, ok, a), ...);
    if (ok) return std::string(buf, n);
  }
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

// Largest dimension and element count fp8flow accepts (kernels index rows/cols with 32-bit ints).
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxNumel = int64_t{1} << 40;
// Most column groups (experts) a grouped op accepts.
constexpr int kMaxGroups = 1024;

// Validator bound to one op name; each method throws fp8flow::Error on failure.
class Check {
 public:
  explicit Check(const char* op) : op_(op) {}

  [[noreturn]] void fail(ErrorKind kind, const std::string& arg, const std::string& msg) const;
  void that(bool cond, const std::string& arg, const std::string& expected, const std::string& got,
            ErrorKind kind = ErrorKind::InvalidArgument) const {
    if (!cond) fail(kind, arg, cat("expected ", expected, ", got ", got));
  }

  // Well-formed view: sizes >= 0 and within limits, ld >= cols, data non-null unless empty,
  // dtype among `dtypes` (empty list: any).
  void view(const TensorView& t, const std::string& arg,
            std::initializer_list<DType> dtypes = {}) const;
  void shape(const TensorView& t, const std::string& arg, int64_t rows, int64_t cols) const;
  void dtype(const TensorView& t, const std::string& arg,
             std::initializer_list<DType> dtypes) const;
  void same_device(const TensorView& a, const std::string& arg_a, const TensorView& b,
                   const std::string& arg_b) const;
  void cols_multiple(const TensorView& t, const std::string& arg, int64_t m) const;
  void contiguous(const TensorView& t, const std::string& arg) const;
  // Data pointer and row pitch aligned to `bytes` (for vector loads/stores on the device).
  void aligned(const TensorView& t, const std::string& arg, size_t bytes) const;
  // A scaled tensor: data dtype in `data_dtypes`, layout as given, scale dtype/shape consistent
  // with the layout, col_groups valid, scale on the data's device, scale contiguous.
  void scaled(const ScaledTensor& t, const std::string& arg, ScaleLayout layout,
              std::initializer_list<DType> data_dtypes) const;
  void groups(std::span<const int64_t> groups, const std::string& arg, int64_t total) const;

  const char* op() const { return op_; }

 private:
  const char* op_;
};

std::string dtype_list(std::initializer_list<DType> dtypes);

}  // namespace fp8flow::detail

#define FP8FLOW_CHECK(cond, kind, msg)                                            \
  do {                                                                            \
    if (!(cond)) ::fp8flow::detail::throw_error(::fp8flow::ErrorKind::kind, msg); \
  } while (0)
