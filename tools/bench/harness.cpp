// fp8flow-bench harness (see harness.h): buffers, device facts, timing, copy bandwidth, comparison,
// and the table/JSON report.
#include "harness.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>
#endif

#if defined(FP8FLOW_GIT_REV_HEADER)
#include "git_rev.h"  // FP8FLOW_GIT_REV at build time (tools/CMakeLists.txt)
#endif
#ifndef FP8FLOW_GIT_REV
#define FP8FLOW_GIT_REV "unknown"
#endif

namespace fp8flow::bench {

#if FP8FLOW_WITH_CUDA
namespace {
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fp8flow-bench: ") + what + ": " + cudaGetErrorString(e));
}
cudaStream_t cuda_stream() {
  return reinterpret_cast<cudaStream_t>(bench_stream());
}
}  // namespace
#define BENCH_CUDA(expr) cuda_check((expr), #expr)
#endif

// ---------------------------------------------------------------------------------------------
// Buffers.

size_t tensor_bytes(DType d, int64_t rows, int64_t cols) {
  return static_cast<size_t>(rows) * static_cast<size_t>(cols) * dtype_bits(d) / 8;
}

Buffer::Buffer(Device device, size_t bytes, uint8_t poison) : bytes_(bytes), device_(device) {
  const size_t n = bytes ? bytes : 1;
  if (device == Device::Cpu) {
    data_ = std::malloc(n);
    if (!data_) throw std::runtime_error("fp8flow-bench: host allocation failed");
    std::memset(data_, poison, n);
    return;
  }
#if FP8FLOW_WITH_CUDA
  BENCH_CUDA(cudaMalloc(&data_, n));
  // On the bench stream (non-blocking, so not ordered with the legacy default stream): the poison
  // lands before anything the bench enqueues later.
  BENCH_CUDA(cudaMemsetAsync(data_, poison, n, cuda_stream()));
#else
  throw std::runtime_error("fp8flow-bench: device buffer in a CPU-only build");
#endif
}

Buffer::Buffer(Buffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_), device_(o.device_) {
  o.data_ = nullptr;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    device_ = o.device_;
    o.data_ = nullptr;
  }
  return *this;
}

Buffer::~Buffer() {
  release();
}

void Buffer::release() {
  if (!data_) return;
  if (device_ == Device::Cpu) std::free(data_);
#if FP8FLOW_WITH_CUDA
  else
    cudaFree(data_);  // no throw from a destructor; a sticky error shows at the next check
#endif
  data_ = nullptr;
}

TensorView Arena::tensor(DType dtype, int64_t rows, int64_t cols) {
  const size_t n = tensor_bytes(dtype, rows, cols);
  buffers_.emplace_back(device_, n, poison());
  allocated_ += n;
  return TensorView{buffers_.back().data(), dtype, rows, cols, -1, device_};
}

ScaledTensor Arena::scaled(DType dtype, ScaleLayout layout, int64_t rows, int64_t cols,
                           std::span<const int64_t> groups) {
  ScaledTensor t;
  t.layout = layout;
  t.col_groups = groups;
  t.data = tensor(dtype, rows, cols);
  const Shape2D s = scale_shape(layout, rows, cols, groups);
  t.scale = tensor(layout == ScaleLayout::Mx1x32 ? DType::E8M0 : DType::F32, s.rows, s.cols);
  return t;
}

void copy_view(const TensorView& dst, const TensorView& src) {
  if (dst.bytes() != src.bytes())
    throw std::runtime_error("fp8flow-bench: copy_view: sizes differ");
  if (src.bytes() == 0) return;
  if (dst.device == Device::Cpu && src.device == Device::Cpu) {
    std::memcpy(dst.data, src.data, src.bytes());
    return;
  }
#if FP8FLOW_WITH_CUDA
  BENCH_CUDA(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDefault, cuda_stream()));
  BENCH_CUDA(cudaStreamSynchronize(cuda_stream()));
#else
  throw std::runtime_error("fp8flow-bench: device copy in a CPU-only build");
#endif
}

std::vector<uint8_t> host_bytes(const TensorView& v) {
  std::vector<uint8_t> out(v.bytes());
  if (out.empty()) return out;
  if (v.device == Device::Cpu) {
    std::memcpy(out.data(), v.data, out.size());
    return out;
  }
#if FP8FLOW_WITH_CUDA
  BENCH_CUDA(
      cudaMemcpyAsync(out.data(), v.data, out.size(), cudaMemcpyDeviceToHost, cuda_stream()));
  BENCH_CUDA(cudaStreamSynchronize(cuda_stream()));
#endif
  return out;
}

// ---------------------------------------------------------------------------------------------
// Device.

DeviceInfo query_device() {
  DeviceInfo info;
#if FP8FLOW_WITH_CUDA
  if (!cuda_available()) return info;
  int dev = 0;
  BENCH_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  BENCH_CUDA(cudaGetDeviceProperties(&p, dev));
  info.gpu = true;
  info.name = p.name;
  info.sm_count = p.multiProcessorCount;
  info.cc_major = p.major;
  info.cc_minor = p.minor;
  info.mem_bytes = static_cast<int64_t>(p.totalGlobalMem);
  int l2 = 0;
  BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  info.l2_bytes = l2;
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  info.runtime = ver(rt);
  info.driver = ver(drv);
#endif
  return info;
}

Stream bench_stream() {
#if FP8FLOW_WITH_CUDA
  // One stream per device (the current one): EP runs drive several devices from several threads.
  static std::mutex mu;
  static cudaStream_t streams[64] = {};
  int dev = 0;
  BENCH_CUDA(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) throw std::runtime_error("fp8flow-bench: device index out of range");
  std::lock_guard<std::mutex> lk(mu);
  if (!streams[dev]) BENCH_CUDA(cudaStreamCreateWithFlags(&streams[dev], cudaStreamNonBlocking));
  return reinterpret_cast<Stream>(streams[dev]);
#else
  return nullptr;
#endif
}

void sync_stream() {
#if FP8FLOW_WITH_CUDA
  BENCH_CUDA(cudaStreamSynchronize(cuda_stream()));
  BENCH_CUDA(cudaGetLastError());
#endif
}

std::pair<size_t, size_t> device_memory() {
#if FP8FLOW_WITH_CUDA
  size_t free_b = 0, total_b = 0;
  BENCH_CUDA(cudaMemGetInfo(&free_b, &total_b));
  return {free_b, total_b};
#else
  return {0, 0};
#endif
}

// ---------------------------------------------------------------------------------------------
// Timing.

double median_of(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

namespace {
Timing summarize(const std::vector<double>& ms) {
  Timing t;
  t.reps = static_cast<int>(ms.size());
  t.median_ms = median_of(ms);
  t.min_ms = ms.empty() ? 0 : *std::min_element(ms.begin(), ms.end());
  return t;
}
}  // namespace

#if FP8FLOW_WITH_CUDA
namespace {
// A stream gate: a host function at the head of a batch that holds the stream until every launch
// of the batch is enqueued, so the GPU runs them back to back and each event pair measures GPU
// time only, not the host's per-call overhead (argument checks, pointer queries). It opens by
// itself after 2 s so an op that synchronizes the host inside cannot deadlock the bench; that is
// reported (Timing::gate_timed_out) since those timings then include host time.
struct Gate {
  std::atomic<bool> open{false};
  std::atomic<bool> timed_out{false};
};

void CUDART_CB gate_wait(void* p) {
  auto* g = static_cast<Gate*>(p);
  const auto t0 = std::chrono::steady_clock::now();
  while (!g->open.load(std::memory_order_acquire)) {
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(2)) {
      g->timed_out.store(true);
      return;
    }
    std::this_thread::yield();
  }
}

constexpr int kBatch = 32;  // launches held at a gate (well below the launch queue's depth)
}  // namespace
#endif

Timing time_gpu(const std::function<void(int)>& launch, int warmup, int reps, int batch) {
#if FP8FLOW_WITH_CUDA
  cudaStream_t s = cuda_stream();
  for (int i = 0; i < warmup; ++i) launch(i);
  sync_stream();
  reps = std::max(reps, 1);
  std::vector<cudaEvent_t> ev(2 * static_cast<size_t>(reps));
  for (auto& e : ev) BENCH_CUDA(cudaEventCreate(&e));
  std::vector<double> ms(static_cast<size_t>(reps));
  bool gate_timed_out = false;
  try {
    batch = std::clamp(batch, 1, kBatch);
    for (int b0 = 0; b0 < reps; b0 += batch) {
      Gate gate;
      BENCH_CUDA(cudaLaunchHostFunc(s, gate_wait, &gate));
      try {
        for (int i = b0; i < std::min(reps, b0 + batch); ++i) {
          BENCH_CUDA(cudaEventRecord(ev[2 * i], s));
          launch(warmup + i);
          BENCH_CUDA(cudaEventRecord(ev[2 * i + 1], s));
        }
      } catch (...) {
        gate.open.store(true, std::memory_order_release);
        cudaStreamSynchronize(s);  // the gate must outlive its host function
        throw;
      }
      gate.open.store(true, std::memory_order_release);
      sync_stream();
      gate_timed_out |= gate.timed_out.load();
    }
    for (int i = 0; i < reps; ++i) {
      float t = 0;
      BENCH_CUDA(cudaEventElapsedTime(&t, ev[2 * i], ev[2 * i + 1]));
      ms[i] = t;
    }
  } catch (...) {
    for (auto& e : ev) cudaEventDestroy(e);
    throw;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  Timing t = summarize(ms);
  t.gate_timed_out = gate_timed_out;
  return t;
#else
  (void)launch;
  (void)warmup;
  (void)reps;
  (void)batch;
  throw std::runtime_error("fp8flow-bench: GPU timing in a CPU-only build");
#endif
}

Timing time_cpu(const std::function<void(int)>& run, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) run(i);
  reps = std::max(reps, 1);
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    run(warmup + i);
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return summarize(ms);
}

CopyBandwidth measure_copy_bandwidth(size_t bytes, int warmup, int reps, int sets) {
  CopyBandwidth bw;
  bw.bytes = bytes;
#if FP8FLOW_WITH_CUDA
  sets = std::max(sets, 1);
  std::vector<Buffer> src, dst;
  for (int i = 0; i < sets; ++i) {
    src.emplace_back(Device::Cuda, bytes, 0x11);
    dst.emplace_back(Device::Cuda, bytes, 0x22);
  }
  const Timing t = time_gpu(
      [&](int i) {
        const size_t j = static_cast<size_t>(i % sets);
        BENCH_CUDA(cudaMemcpyAsync(dst[j].data(), src[j].data(), bytes, cudaMemcpyDeviceToDevice,
                                   cuda_stream()));
      },
      warmup, reps);
  bw.median_ms = t.median_ms;
  bw.gbps = 2.0 * static_cast<double>(bytes) / (t.median_ms * 1e6);
#else
  (void)warmup;
  (void)reps;
  (void)sets;
#endif
  return bw;
}

int rotation_sets(size_t set_bytes, int64_t l2_bytes, size_t budget_bytes, int max_sets) {
  if (set_bytes == 0) return 1;
  const double want =
      std::ceil(4.0 * static_cast<double>(l2_bytes) / static_cast<double>(set_bytes));
  int n = static_cast<int>(std::clamp(want, 1.0, static_cast<double>(max_sets)));
  const size_t fit = budget_bytes / set_bytes;
  n = std::min<int64_t>(n, std::max<size_t>(fit, 1));
  return std::max(n, 1);
}

// ---------------------------------------------------------------------------------------------
// Comparison.

Comparison compare_outputs(const NamedViews& got, const NamedViews& want) {
  Comparison c;
  if (got.size() != want.size()) {
    c.equal = false;
    c.detail = "different number of outputs";
    return c;
  }
  std::ostringstream os;
  for (size_t i = 0; i < got.size(); ++i) {
    const std::vector<uint8_t> a = host_bytes(got[i].second);
    const std::vector<uint8_t> b = host_bytes(want[i].second);
    if (a.size() != b.size()) {
      c.equal = false;
      os << (os.tellp() > 0 ? "; " : "") << got[i].first << ": sizes differ";
      continue;
    }
    size_t bad = 0, first = 0;
    for (size_t j = 0; j < a.size(); ++j)
      if (a[j] != b[j]) {
        if (!bad) first = j;
        ++bad;
      }
    if (!bad) continue;
    c.equal = false;
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "%s: %zu of %zu bytes differ, first at byte %zu (got 0x%02x, want 0x%02x)",
                  got[i].first.c_str(), bad, a.size(), first, a[first], b[first]);
    os << (os.tellp() > 0 ? "; " : "") << buf;
  }
  c.detail = os.str();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Report.

void Report::meta(const std::string& key, Value v) {
  for (auto& kv : meta_)
    if (kv.first == key) {
      kv.second = std::move(v);
      return;
    }
  meta_.emplace_back(key, std::move(v));
}

size_t Report::add_row() {
  rows_.emplace_back();
  return rows_.size() - 1;
}

void Report::set(size_t row, const std::string& key, Value v) {
  auto& r = rows_.at(row);
  for (auto& kv : r)
    if (kv.first == key) {
      kv.second = std::move(v);
      return;
    }
  r.emplace_back(key, std::move(v));
}

const Value& Report::get(size_t row, const std::string& key) const {
  static const Value kNull;
  for (const auto& kv : rows_.at(row))
    if (kv.first == key) return kv.second;
  return kNull;
}

std::string format_value(const Value& v, int precision) {
  char buf[64];
  switch (v.index()) {
    case 0:
      return "-";
    case 1:
      return std::get<bool>(v) ? "yes" : "no";
    case 2:
      return std::to_string(std::get<int64_t>(v));
    case 3: {
      const double d = std::get<double>(v);
      if (!std::isfinite(d)) return "-";
      std::snprintf(buf, sizeof buf, "%.*f", precision, d);
      return buf;
    }
    default:
      return std::get<std::string>(v);
  }
}

namespace {
std::string pad(const std::string& s, int width, bool left) {
  if (static_cast<int>(s.size()) >= width) return s;
  const std::string fill(static_cast<size_t>(width) - s.size(), ' ');
  return left ? s + fill : fill + s;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        o += "\\\"";
        break;
      case '\\':
        o += "\\\\";
        break;
      case '\n':
        o += "\\n";
        break;
      case '\t':
        o += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o += buf;
        } else {
          o += ch;
        }
    }
  }
  return o;
}

std::string json_value(const Value& v) {
  char buf[64];
  switch (v.index()) {
    case 0:
      return "null";
    case 1:
      return std::get<bool>(v) ? "true" : "false";
    case 2:
      return std::to_string(std::get<int64_t>(v));
    case 3: {
      const double d = std::get<double>(v);
      if (!std::isfinite(d)) return "null";
      std::snprintf(buf, sizeof buf, "%.9g", d);
      return buf;
    }
    default: {
      std::string s(1, '"');  // appends: GCC 12 warns (-Wrestrict) on "\"" + s + "\""
      s += json_escape(std::get<std::string>(v));
      s += '"';
      return s;
    }
  }
}
}  // namespace

std::string Report::table() const {
  std::ostringstream os;
  for (const auto& [k, v] : meta_) os << "# " << k << ": " << format_value(v, 3) << "\n";
  std::string header, rule;
  for (const auto& c : columns_) {
    header += pad(c.title, c.width, c.left) + "  ";
    rule += std::string(static_cast<size_t>(c.width), '-') + "  ";
  }
  auto rstrip = [](std::string x) {
    while (!x.empty() && x.back() == ' ') x.pop_back();
    return x;
  };
  os << rstrip(header) << "\n" << rstrip(rule) << "\n";
  for (size_t r = 0; r < rows_.size(); ++r) {
    const Value& err = get(r, "error");
    const bool is_err = err.index() == 4 && !std::get<std::string>(err).empty();
    std::string line;
    for (const auto& c : columns_) {
      if (is_err && !c.always) continue;
      std::string cell = format_value(get(r, c.key), c.precision);
      if (static_cast<int>(cell.size()) > c.width && c.left) cell = cell.substr(0, c.width);
      line += pad(cell, c.width, c.left) + "  ";
    }
    if (is_err) line += "error: " + std::get<std::string>(err);
    while (!line.empty() && line.back() == ' ') line.pop_back();
    os << line << "\n";
  }
  return os.str();
}

void Report::write_json(const std::string& path) const {
  std::ostringstream os;
  os << "{\n  \"meta\": {";
  for (size_t i = 0; i < meta_.size(); ++i)
    os << (i ? ",\n    " : "\n    ") << "\"" << json_escape(meta_[i].first)
       << "\": " << json_value(meta_[i].second);
  os << "\n  },\n  \"rows\": [";
  for (size_t r = 0; r < rows_.size(); ++r) {
    os << (r ? ",\n    {" : "\n    {");
    for (size_t i = 0; i < rows_[r].size(); ++i)
      os << (i ? ", " : "") << "\"" << json_escape(rows_[r][i].first)
         << "\": " << json_value(rows_[r][i].second);
    os << "}";
  }
  os << "\n  ]\n}\n";
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("fp8flow-bench: cannot write " + path);
  f << os.str();
  if (!f) throw std::runtime_error("fp8flow-bench: write failed: " + path);
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// $FP8FLOW_GIT_REV at run time wins (e.g. binaries built from an uncommitted tree, "-dirty");
// else the revision of the build (tools/CMakeLists.txt).
std::string git_rev() {
  if (const char* env = std::getenv("FP8FLOW_GIT_REV"); env && *env) return env;
  return FP8FLOW_GIT_REV;
}

}  // namespace fp8flow::bench
