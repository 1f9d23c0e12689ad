// fp8flow-bench harness: what every subcommand (ops, later layer and comm) shares and no op case
// needs to know about. Owned host/device buffers with poisoning, device facts, CUDA-event timing
// with median/min, the device-to-device copy bandwidth that every GB/s figure is compared with,
// the L2 rotation rule, byte-exact comparison of outputs, and one Report that prints a fixed-width
// table and writes the same rows as JSON.
//
// Everything goes through the public API plus the CUDA runtime; CUDA code is behind
// FP8FLOW_WITH_CUDA so the tool also builds (and runs the CPU reference) without CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "fp8flow/fp8flow.h"

namespace fp8flow::bench {

// ---------------------------------------------------------------------------------------------
// Buffers.

// Bytes of a dtype x rows x cols tensor (E2M1x2 counts 4 bits per element).
size_t tensor_bytes(DType d, int64_t rows, int64_t cols);

// One owned allocation on the host (malloc) or on the current CUDA device (cudaMalloc), filled with
// `poison` so that a byte an op forgot to write shows up in a comparison. Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device device, size_t bytes, uint8_t poison);
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void release();
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_ = Device::Cpu;
};

// Allocates views that live as long as the arena. Host arenas poison with 0x5A and device arenas
// with 0xA5, so an output byte left unwritten on both sides still differs.
class Arena {
 public:
  explicit Arena(Device device) : device_(device) {}
  Device device() const { return device_; }
  uint8_t poison() const { return device_ == Device::Cpu ? 0x5A : 0xA5; }

  TensorView tensor(DType dtype, int64_t rows, int64_t cols);
  // Data plus scales of the shape `layout` needs: F32 scales for the FP8 layouts, E8M0 for Mx1x32.
  // `groups` must outlive the returned view (it is referenced, not copied).
  ScaledTensor scaled(DType dtype, ScaleLayout layout, int64_t rows, int64_t cols,
                      std::span<const int64_t> groups = {});
  size_t bytes_allocated() const { return allocated_; }

 private:
  Device device_;
  std::vector<Buffer> buffers_;
  size_t allocated_ = 0;
};

// Copies `src` into `dst` (same byte size; contiguous; any pair of devices).
void copy_view(const TensorView& dst, const TensorView& src);
// The bytes of a contiguous view, on the host.
std::vector<uint8_t> host_bytes(const TensorView& v);

// ---------------------------------------------------------------------------------------------
// The device and the stream every GPU measurement runs on.

struct DeviceInfo {
  bool gpu = false;  // a CUDA device is visible and the build has the CUDA backend
  std::string name = "none";
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  int64_t l2_bytes = 0;
  int64_t mem_bytes = 0;
  std::string runtime = "n/a", driver = "n/a";
};
DeviceInfo query_device();

// The non-blocking stream the bench launches on (created on first use; nullptr without CUDA).
Stream bench_stream();
// Waits for bench_stream() and turns a pending CUDA error into an exception.
void sync_stream();
// Free and total device memory in bytes (0, 0 without CUDA).
std::pair<size_t, size_t> device_memory();

// ---------------------------------------------------------------------------------------------
// Timing.

struct Timing {
  double median_ms = 0;
  double min_ms = 0;
  int reps = 0;
  bool gate_timed_out = false;  // see time_gpu: the times include host time
};
double median_of(std::vector<double> v);

// `launch(i)` enqueues repetition i on bench_stream(). Warm-up launches first (synchronized), then
// every timed launch between its own pair of CUDA events: median and min of the per-launch times.
// Timed launches are enqueued in batches of `batch` held behind a host-function gate, so the GPU
// runs a batch back to back and host-side call overhead never shows up as GPU time. Ops that
// enqueue many kernels per call (grouped GEMMs) use a smaller batch so a held batch stays well
// inside the launch queue.
Timing time_gpu(const std::function<void(int)>& launch, int warmup, int reps, int batch = 32);
// Host wall-clock version (the CPU reference fallback).
Timing time_cpu(const std::function<void(int)>& run, int warmup, int reps);

// cudaMemcpyAsync device to device of `bytes`: GB/s counting bytes read + written (2 x bytes).
struct CopyBandwidth {
  double gbps = 0;
  double median_ms = 0;
  size_t bytes = 0;
};
// cudaMemcpyAsync device to device of `bytes`, rotating over `sets` source/destination pairs (so
// that, as for the ops' own timings, the L2 cannot hold a pair between its uses).
CopyBandwidth measure_copy_bandwidth(size_t bytes, int warmup, int reps, int sets = 1);

// How many input/output buffer sets to rotate over so that one pass over them touches at least
// 4x the L2 (the cache then cannot hold a set between its uses): ceil(4 * l2 / set_bytes), at
// least 1, at most `max_sets`, and no more than fit in `budget_bytes`.
int rotation_sets(size_t set_bytes, int64_t l2_bytes, size_t budget_bytes, int max_sets = 64);

// ---------------------------------------------------------------------------------------------
// Byte-exact comparison of named outputs (device or host views, same shapes in the same order).

struct Comparison {
  bool equal = true;
  std::string
      detail;  // empty when equal; else "name: N of M bytes differ, first at ..." per output
};
using NamedViews = std::vector<std::pair<std::string, TensorView>>;
Comparison compare_outputs(const NamedViews& got, const NamedViews& want);

// ---------------------------------------------------------------------------------------------
// Report: a table on stdout and the same rows as JSON.

using Value = std::variant<std::monostate, bool, int64_t, double, std::string>;

struct Column {
  std::string key;    // JSON key of the cell
  std::string title;  // table header
  int width = 10;
  bool left = false;    // left-aligned (text) or right-aligned (numbers)
  int precision = 3;    // digits after the point for doubles
  bool always = false;  // printed even on an error row (identity columns: case, shape)
};

class Report {
 public:
  void meta(const std::string& key, Value v);
  void columns(std::vector<Column> cols) { columns_ = std::move(cols); }
  // A new row; returns its index. Cells not named by a column still go to the JSON.
  size_t add_row();
  void set(size_t row, const std::string& key, Value v);
  const Value& get(size_t row, const std::string& key) const;
  size_t rows() const { return rows_.size(); }

  // Header lines (meta), the column titles, then one line per row. A row whose "error" cell is a
  // non-empty string prints its identity columns followed by "error: ...".
  std::string table() const;
  // {"meta": {...}, "rows": [{...}, ...]}; throws std::runtime_error when the file can't be
  // written.
  void write_json(const std::string& path) const;

 private:
  std::vector<std::pair<std::string, Value>> meta_;
  std::vector<Column> columns_;
  std::vector<std::vector<std::pair<std::string, Value>>> rows_;
};

std::string format_value(const Value& v, int precision);
// "2026-11-26 14:03:11 UTC".
std::string utc_now();
// `git describe` of the source tree at configure time (FP8FLOW_GIT_REV), or "unknown".
std::string git_rev();

}  // namespace fp8flow::bench
