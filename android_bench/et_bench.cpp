/*
 * et_bench: time the methods of an ExecuTorch .pte program.
 *
 *   et_bench --model_path F [--methods a,b,...] [--method NAME]... [--warmup N]
 *            [--iterations N] [--min_time_ms X] [--threads N] [--affinity HEXMASK] [--list]
 *            [--interleave] [--group N] [--seed N] [--reference NAME] [--ci_target X] [--max_time_ms X]
 *            [--rewarm N]
 *
 * Without --methods/--method: every method. --method (repeatable) takes one name
 * verbatim (empty, or holding a comma); both flags add to one selection, in order.
 *
 * stdout: one JSON object per method per line (flushed after each method):
 *   {"method": str, "iterations_us": [...], "load_ms": float, "threads": int,
 *    "affinity": str|null, "warmup": int, "runtime_version": str,
 *    "pool_threads": int, "affinity_effective": str}
 * (the last two are extras: the threadpool size and CPU mask really in force).
 *
 * Interleaved rounds (--interleave; --reference or --ci_target imply it): the
 * selection is timed in groups of at most --group methods (default 32), each
 * group in rounds that run every method once in an order shuffled by --seed.
 * --reference NAME runs in every round of every group; records then add
 *   "interleaved": true, "seed", "group", "rounds" (that this method took part in; a method
 *   leaves once it has its --iterations, its CI and rounds spanning --min_time_ms of wall time:
 *   the other methods and the reference fill a round, so a tiny method needs far fewer runs than
 *   it would alone), "reference": str|null,
 *   "reference_us": [...] (the reference's sample of the same round as each of ours),
 * and with --ci_target X (a relative half-width, e.g. 0.02) rounds go on past
 * --iterations until every method's 95 % median CI (of its ratio to the reference
 * when there is one) is within +-X, or --max_time_ms was timed in the group:
 *   "ci_rel": float, "converged": bool.
 * --rewarm N (default 1): untimed runs of a method just before its timed run in
 * each round: without them a small method timed right after a big one runs on
 * the big one's caches (measured: +26 % and a 26 % spread on a 25 us unit), a
 * cost of interleaving, not of the device.
 * A selected reference is printed last, pooled over all groups ("is_reference": true).
 * Records are printed (and flushed) per group; a method that fails in this mode
 * is first named on stdout: {"failed_method": str, "error": str}.
 * --list prints {"methods": [...]} and exits 0.
 * Errors: one line on stderr; exit 2 (bad arguments, missing file, unknown
 * method), 3 (program/method load failure), 4 (execution failure).
 *
 * The same source builds on the host (against the executorch pip wheel) and
 * for Android (against an ExecuTorch install tree built with the NDK).
 */

#include <executorch/extension/threadpool/threadpool.h>
#include <executorch/runtime/core/data_loader.h>
#include <executorch/runtime/core/error.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/memory_allocator.h>
#include <executorch/runtime/core/portable_type/bfloat16.h>
#include <executorch/runtime/core/portable_type/half.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/method_meta.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <memory>
#include <string>
#include <vector>

#ifndef ET_BENCH_RUNTIME_VERSION
#define ET_BENCH_RUNTIME_VERSION "unknown"
#endif

namespace et = ::executorch::runtime;
namespace etensor = ::executorch::runtime::etensor;
using et::Error;

namespace {

constexpr int kExitUsage = 2;
constexpr int kExitLoad = 3;
constexpr int kExitExec = 4;

// ---------------------------------------------------------------- errors ---

// The first errors the runtime logged since the last report: appended to our
// one-line messages so the caller sees *why* (e.g. "Check failed (indices <
// size)"), not just an error code. The first ones name the cause; later ones
// are the caller's generic "KernelCall failed" and per-argument dumps.
std::string g_runtime_errors;
int g_runtime_error_count = 0;
bool g_verbose = false;

void pal_log(
    et_timestamp_t /*timestamp*/,
    et_pal_log_level_t level,
    const char* filename,
    const char* /*function*/,
    size_t line,
    const char* message,
    size_t length) {
  if (g_verbose) {
    fprintf(stderr, "[et %c %s:%zu] %.*s\n", (char)level, filename ? filename : "?", line, (int)length, message);
  }
  if (((char)level == 'E' || (char)level == 'F') && g_runtime_error_count < 2) {
    if (g_runtime_error_count++) g_runtime_errors += "; ";
    g_runtime_errors.append(message, std::min<size_t>(length, 300));
  }
}

void clear_runtime_errors() {
  g_runtime_errors.clear();
  g_runtime_error_count = 0;
}

// One line of printable ASCII: runtime messages can quote raw bytes of a corrupt file.
std::string one_line(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n' || c == '\r' || c == '\t') {
      out += ' ';
    } else if (c < 0x20 || c >= 0x7f) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += (char)c;
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

[[noreturn]] void die(int code, const std::string& msg) {
  fflush(stdout);
  fprintf(stderr, "et_bench: %s\n", one_line(msg).c_str());
  fflush(stderr);
  _exit(code);  // no static destructors: the runtime may be half-initialized
}

std::string describe(Error e) {
  std::string s = et::to_string(e);
  if (!g_runtime_errors.empty()) s += " (runtime: " + g_runtime_errors + ")";
  clear_runtime_errors();
  return s;
}

// Route runtime logs through pal_log. The wheel's _portable_lib registers its
// own PAL from a static initializer, so replacing it logs a "register_pal()
// called multiple times" warning through the old PAL to stderr: keep that line
// out of our one-line error contract by muting fd 2 for the call.
void install_pal() {
  fflush(stderr);
  int saved = dup(STDERR_FILENO);
  int devnull = open("/dev/null", O_WRONLY);
  if (saved >= 0 && devnull >= 0) dup2(devnull, STDERR_FILENO);
  et::register_pal(et::PalImpl::create(pal_log, __FILE__));
  fflush(stderr);
  if (saved >= 0 && devnull >= 0) dup2(saved, STDERR_FILENO);
  if (saved >= 0) close(saved);
  if (devnull >= 0) close(devnull);
}

// A crash inside the runtime (a garbled .pte can get past verification, an
// ET_CHECK aborts) still ends with one line and the documented exit code.
volatile sig_atomic_t g_phase_code = kExitLoad;
char g_phase[256] = "starting";

void on_fatal_signal(int sig) {
  char buf[512];
  int n = snprintf(buf, sizeof(buf), "et_bench: crashed with signal %d while %s\n", sig, g_phase);
  if (n > 0) {
    ssize_t ignored = write(STDERR_FILENO, buf, std::min<size_t>((size_t)n, sizeof(buf) - 1));
    (void)ignored;
  }
  _exit(g_phase_code);
}

void set_phase(int code, const std::string& what) {
  clear_runtime_errors();
  g_phase_code = code;
  snprintf(g_phase, sizeof(g_phase), "%s", what.c_str());
}

void install_signal_handlers() {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_fatal_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT}) {
    sigaction(sig, &sa, nullptr);
  }
}

// ------------------------------------------------------------- arguments ---

struct Args {
  std::string model_path;
  std::vector<std::string> methods;  // the selection, in order, without repeats
  bool methods_given = false;        // false: all (a selection can be one empty name)
  long warmup = 5;
  long iterations = 20;
  double min_time_ms = 0.0;
  long threads = 1;  // 0: leave the runtime's default pool size
  std::string affinity;  // normalized hex, "" when not given
  bool list = false;
  // Interleaved rounds (any of --interleave, --reference, --ci_target turns them on).
  bool interleave = false;
  long group = 32;          // methods loaded and interleaved at once (0: all)
  long seed = 0;            // shuffles each round's order
  std::string reference;    // runs in every round of every group; "" for none
  bool reference_given = false;
  double ci_target = 0.0;   // > 0: rounds go on until every method's median CI is within +-this (relative)
  double max_time_ms = 20000.0;  // ... or this much was timed in the group
  long rewarm = 1;  // untimed runs of a method right before its timed one in each round
};

const char* kUsage =
    "usage: et_bench --model_path F [--methods a,b,...] [--method NAME]... [--warmup N]\n"
    "                [--iterations N] [--min_time_ms X] [--threads N] [--affinity HEXMASK] [--list]\n"
    "                [--interleave] [--group N] [--seed N] [--reference NAME] [--ci_target X] [--max_time_ms X]\n"
    "                [--rewarm N]\n";

// --methods splits on commas; --method takes one name as it is, so a name that holds a
// comma or is empty (both legal in a program) can still be selected.
void select_method(Args& a, const std::string& name) {
  if (std::find(a.methods.begin(), a.methods.end(), name) == a.methods.end()) a.methods.push_back(name);
  a.methods_given = true;
}

long parse_long(const std::string& flag, const std::string& v, long lo) {
  char* end = nullptr;
  errno = 0;
  long x = strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < lo) {
    die(kExitUsage, flag + " expects an integer >= " + std::to_string(lo) + ", got '" + v + "'");
  }
  return x;
}

double parse_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  double x = strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || errno != 0 || !(x >= 0.0) || x > 1e9) {
    die(kExitUsage, flag + " expects a number >= 0, got '" + v + "'");
  }
  return x;
}

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    std::string item = s.substr(start, comma - start);
    if (!item.empty() && std::find(out.begin(), out.end(), item) == out.end()) out.push_back(item);
    start = comma + 1;
  }
  return out;
}

std::string normalize_mask(const std::string& raw) {
  std::string s = raw;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) s = s.substr(2);
  if (s.empty() || s.size() > 256) die(kExitUsage, "--affinity expects a hex CPU mask like f0, got '" + raw + "'");
  for (char& c : s) {
    if (!isxdigit((unsigned char)c)) die(kExitUsage, "--affinity expects a hex CPU mask like f0, got '" + raw + "'");
    c = (char)tolower((unsigned char)c);
  }
  size_t nz = s.find_first_not_of('0');
  if (nz == std::string::npos) die(kExitUsage, "--affinity mask selects no CPU: '" + raw + "'");
  return s.substr(nz);
}

Args parse_args(int argc, char** argv) {
  Args a;
  bool have_model = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_inline = false;
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_inline = true;
    }
    auto next = [&]() -> std::string {
      if (has_inline) return value;
      if (i + 1 >= argc) die(kExitUsage, arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      fputs(kUsage, stdout);
      exit(0);
    } else if (arg == "--list") {
      if (has_inline) die(kExitUsage, "--list takes no value");
      a.list = true;
    } else if (arg == "--model_path") {
      a.model_path = next();
      have_model = true;
    } else if (arg == "--methods") {
      std::vector<std::string> names = split_csv(next());
      if (names.empty()) die(kExitUsage, "--methods is empty");
      for (const auto& n : names) select_method(a, n);
    } else if (arg == "--method") {
      select_method(a, next());
    } else if (arg == "--warmup") {
      a.warmup = parse_long(arg, next(), 0);
    } else if (arg == "--iterations") {
      a.iterations = parse_long(arg, next(), 1);
    } else if (arg == "--min_time_ms") {
      a.min_time_ms = parse_double(arg, next());
    } else if (arg == "--threads") {
      a.threads = parse_long(arg, next(), 0);
      if (a.threads > 1024) die(kExitUsage, "--threads " + std::to_string(a.threads) + " is too many");
    } else if (arg == "--affinity") {
      a.affinity = normalize_mask(next());
    } else if (arg == "--interleave") {
      if (has_inline) die(kExitUsage, "--interleave takes no value");
      a.interleave = true;
    } else if (arg == "--group") {
      a.group = parse_long(arg, next(), 0);
    } else if (arg == "--seed") {
      a.seed = parse_long(arg, next(), 0);
    } else if (arg == "--reference") {
      a.reference = next();
      a.reference_given = true;
      a.interleave = true;
    } else if (arg == "--ci_target") {
      a.ci_target = parse_double(arg, next());
      if (a.ci_target > 0) a.interleave = true;
    } else if (arg == "--rewarm") {
      a.rewarm = parse_long(arg, next(), 0);
    } else if (arg == "--max_time_ms") {
      a.max_time_ms = parse_double(arg, next());
    } else {
      die(kExitUsage, "unknown argument '" + std::string(argv[i]) + "' (see --help)");
    }
  }
  if (!have_model || a.model_path.empty()) die(kExitUsage, "--model_path is required (see --help)");
  return a;
}

// -------------------------------------------------------------- affinity ---

void apply_affinity(const std::string& hex) {
  cpu_set_t set;
  CPU_ZERO(&set);
  // hex is most-significant digit first: the last digit holds CPUs 0-3.
  int bit = 0;
  for (auto it = hex.rbegin(); it != hex.rend(); ++it, bit += 4) {
    int nibble = isdigit((unsigned char)*it) ? *it - '0' : *it - 'a' + 10;
    for (int b = 0; b < 4; ++b) {
      if ((nibble >> b) & 1) {
        if (bit + b >= CPU_SETSIZE) die(kExitUsage, "--affinity mask names CPU " + std::to_string(bit + b) + ", beyond CPU_SETSIZE");
        CPU_SET(bit + b, &set);
      }
    }
  }
  // Every thread that exists now (libraries may have started some); threads
  // created later (the threadpool) inherit the mask of their creator.
  std::vector<pid_t> tids;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] != '.') tids.push_back((pid_t)atoi(e->d_name));
    }
    closedir(d);
  }
  if (tids.empty()) tids.push_back(0);
  for (pid_t tid : tids) {
    if (sched_setaffinity(tid, sizeof(set), &set) != 0) {
      die(kExitUsage, "cannot set CPU affinity to 0x" + hex + ": " + strerror(errno) + " (does the mask name CPUs this process may use?)");
    }
  }
}

// The mask the kernel actually applied (the requested one minus offline or
// forbidden CPUs), as hex: reported as "affinity_effective".
std::string effective_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return "";
  std::string hex;
  for (int base = 0; base < CPU_SETSIZE; base += 4) {
    int nibble = 0;
    for (int b = 0; b < 4; ++b) nibble |= CPU_ISSET(base + b, &set) ? (1 << b) : 0;
    hex.insert(hex.begin(), "0123456789abcdef"[nibble]);
  }
  size_t nz = hex.find_first_not_of('0');
  return nz == std::string::npos ? "0" : hex.substr(nz);
}

// ---------------------------------------------------------------- memory ---

void* aligned_malloc(size_t size, size_t alignment) {
  if (alignment < sizeof(void*)) alignment = sizeof(void*);
  void* p = nullptr;
  if (posix_memalign(&p, alignment, size ? size : 1) != 0) return nullptr;
  return p;
}

struct FreeDeleter {
  void operator()(void* p) const { free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

// A MemoryAllocator backed by malloc: the method and temp allocators never run
// out on big models, and everything is freed when the method is done.
class MallocAllocator final : public et::MemoryAllocator {
 public:
  MallocAllocator() : et::MemoryAllocator(0, nullptr) {}
  ~MallocAllocator() override { reset(); }
  void* allocate(size_t size, size_t alignment = kDefaultAlignment) override {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0) return nullptr;
    void* p = aligned_malloc(size, alignment);
    if (p) blocks_.push_back(p);
    return p;
  }
  void reset() override {
    for (void* p : blocks_) free(p);
    blocks_.clear();
  }

 private:
  std::vector<void*> blocks_;
};

// The whole .pte in one aligned buffer; segments are views into it.
class FileBufferLoader final : public et::DataLoader {
 public:
  FileBufferLoader(Buffer data, size_t size) : data_(std::move(data)), size_(size) {}
  et::Result<et::FreeableBuffer> load(size_t offset, size_t size, const SegmentInfo&) const override {
    if (offset > size_ || size > size_ - offset) return Error::InvalidArgument;
    return et::FreeableBuffer(data_.get() + offset, size, nullptr);
  }
  Error load_into(size_t offset, size_t size, const SegmentInfo&, void* buffer) const override {
    if (offset > size_ || size > size_ - offset || buffer == nullptr) return Error::InvalidArgument;
    memcpy(buffer, data_.get() + offset, size);
    return Error::Ok;
  }
  et::Result<size_t> size() const override { return size_; }

 private:
  Buffer data_;
  size_t size_;
};

std::unique_ptr<FileBufferLoader> read_file(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) die(kExitUsage, "model file not found: " + path);
  if (!S_ISREG(st.st_mode)) die(kExitUsage, "model path is not a regular file: " + path);
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) die(kExitUsage, "cannot open model file " + path + ": " + strerror(errno));
  size_t size = (size_t)st.st_size;
  Buffer data((uint8_t*)aligned_malloc(size, 4096));
  if (!data) die(kExitLoad, "out of memory reading " + path);
  size_t got = size ? fread(data.get(), 1, size, f) : 0;
  fclose(f);
  if (got != size) die(kExitLoad, "short read on " + path);
  return std::make_unique<FileBufferLoader>(std::move(data), size);
}

// ---------------------------------------------------------------- inputs ---

// Deterministic inputs: the same .pte gets the same bytes on every device.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed ? seed : 0x9E3779B97F4A7C15ull) {}
  uint64_t next() {  // xorshift64*
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  float uniform() { return (float)((next() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }  // [-1, 1)
};

void fill(void* data, size_t nbytes, executorch::aten::ScalarType type, uint64_t seed) {
  using executorch::aten::ScalarType;
  Rng rng(seed);
  switch (type) {
    case ScalarType::Float: {
      auto* p = (float*)data;
      for (size_t i = 0; i < nbytes / sizeof(float); ++i) p[i] = rng.uniform();
      return;
    }
    case ScalarType::Double: {
      auto* p = (double*)data;
      for (size_t i = 0; i < nbytes / sizeof(double); ++i) p[i] = rng.uniform();
      return;
    }
    case ScalarType::Half: {
      auto* p = (executorch::aten::Half*)data;
      for (size_t i = 0; i < nbytes / sizeof(*p); ++i) p[i] = executorch::aten::Half(rng.uniform());
      return;
    }
    case ScalarType::BFloat16: {
      auto* p = (executorch::aten::BFloat16*)data;
      for (size_t i = 0; i < nbytes / sizeof(*p); ++i) p[i] = executorch::aten::BFloat16(rng.uniform());
      return;
    }
    case ScalarType::Bool:
    case ScalarType::Byte:
    case ScalarType::Char: {
      auto* p = (uint8_t*)data;
      for (size_t i = 0; i < nbytes; ++i) p[i] = (uint8_t)(rng.next() >> 63);
      return;
    }
    case ScalarType::Short: {
      auto* p = (int16_t*)data;
      for (size_t i = 0; i < nbytes / sizeof(*p); ++i) p[i] = (int16_t)(rng.next() >> 63);
      return;
    }
    case ScalarType::Int: {
      auto* p = (int32_t*)data;
      for (size_t i = 0; i < nbytes / sizeof(*p); ++i) p[i] = (int32_t)(rng.next() >> 63);
      return;
    }
    case ScalarType::Long: {
      auto* p = (int64_t*)data;
      for (size_t i = 0; i < nbytes / sizeof(*p); ++i) p[i] = (int64_t)(rng.next() >> 63);
      return;
    }
    default:
      memset(data, 0, nbytes);  // quantized and other exotic types: zeros
      return;
  }
}

// Owns the storage behind one input tensor.
struct InputTensor {
  std::vector<etensor::TensorImpl::SizesType> sizes;
  std::vector<etensor::TensorImpl::DimOrderType> dim_order;
  std::vector<etensor::TensorImpl::StridesType> strides;
  Buffer data;
  std::unique_ptr<etensor::TensorImpl> impl;
};

std::vector<std::unique_ptr<InputTensor>> set_inputs(et::Method& method, const et::MethodMeta& meta, const std::string& name) {
  std::vector<std::unique_ptr<InputTensor>> owned;
  for (size_t i = 0; i < meta.num_inputs(); ++i) {
    auto tag = meta.input_tag(i);
    if (!tag.ok()) die(kExitLoad, "cannot read input " + std::to_string(i) + " of method " + name + ": " + describe(tag.error()));
    if (tag.get() != et::Tag::Tensor) continue;  // scalars are baked into the program
    auto info = meta.input_tensor_meta(i);
    if (!info.ok()) die(kExitLoad, "cannot read input " + std::to_string(i) + " of method " + name + ": " + describe(info.error()));
    auto t = std::make_unique<InputTensor>();
    auto sizes = info->sizes();
    auto order = info->dim_order();
    t->sizes.assign(sizes.begin(), sizes.end());
    t->dim_order.assign(order.begin(), order.end());
    size_t dim = t->sizes.size();
    if (t->dim_order.size() != dim) {
      t->dim_order.resize(dim);
      for (size_t d = 0; d < dim; ++d) t->dim_order[d] = (uint8_t)d;
    }
    // Strides that follow the dim order (contiguous or channels-last).
    t->strides.assign(dim, 1);
    for (size_t k = dim; k-- > 1;) {
      size_t inner = t->dim_order[k], outer = t->dim_order[k - 1];
      t->strides[outer] = t->strides[inner] * t->sizes[inner];
    }
    size_t nbytes = info->nbytes();
    t->data.reset((uint8_t*)aligned_malloc(nbytes, 64));
    if (!t->data) die(kExitExec, "out of memory for input " + std::to_string(i) + " of method " + name);
    fill(t->data.get(), nbytes, info->scalar_type(), 0x5EEDull + i);
    t->impl = std::make_unique<etensor::TensorImpl>(
        info->scalar_type(), (ssize_t)dim, t->sizes.data(), t->data.get(), t->dim_order.data(), t->strides.data());
    Error err = method.set_input(et::EValue(executorch::aten::Tensor(t->impl.get())), i);
    if (err != Error::Ok) die(kExitExec, "cannot set input " + std::to_string(i) + " of method " + name + ": " + describe(err));
    owned.push_back(std::move(t));
  }
  return owned;
}

// ------------------------------------------------------------------ json ---

std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += (char)c;
        }
    }
  }
  return out + "\"";
}

std::string fmt(double x) {
  char buf[64];
  snprintf(buf, sizeof(buf), "%.3f", x);
  return buf;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// ----------------------------------------------------------------- bench ---

struct RunInfo {
  size_t pool_threads;
  std::string affinity_effective;
};

// One loaded method with everything it needs to execute (heap-allocated: the
// allocators hold pointers into the planned buffers and must not move).
struct LoadedMethod {
  std::string name;
  std::vector<Buffer> planned;
  std::vector<et::Span<uint8_t>> spans;
  std::unique_ptr<et::HierarchicalAllocator> planned_memory;
  MallocAllocator method_allocator;
  MallocAllocator temp_allocator;
  std::unique_ptr<et::MemoryManager> memory_manager;
  std::unique_ptr<et::Result<et::Method>> method;
  std::vector<std::unique_ptr<InputTensor>> inputs;
  double load_ms = 0.0;
  std::vector<double> us;           // timed samples
  std::vector<double> reference_us;  // the reference's sample in the same round as each of ours
  double timed_ms = 0.0;
  // Interleaved rounds: the wall time of the rounds this method took part in. --min_time_ms asks
  // for a measurement that spans that much of the device's time; in rounds the other methods and
  // the reference fill the span, so a 0.3 us unit next to a 40 us reference needs ~750 rounds, not
  // 100,000 (which ran the reference 100,000 times: seconds per tiny unit).
  double span_ms = 0.0;
};

// In interleaved mode a failing method is named on stdout before the one-line
// error, so the caller knows which one to drop (the order of output no longer says).
bool g_interleaved = false;

[[noreturn]] void die_on(int code, const std::string& method, const std::string& msg) {
  if (g_interleaved) {
    std::string line = "{\"failed_method\": " + json_str(method) + ", \"error\": " + json_str(one_line(msg)) + "}\n";
    fputs(line.c_str(), stdout);
  }
  die(code, msg);
}

std::unique_ptr<LoadedMethod> load_for_bench(const et::Program& program, const std::string& name) {
  auto lm = std::make_unique<LoadedMethod>();
  lm->name = name;
  set_phase(kExitLoad, "loading method " + name);
  auto meta = program.method_meta(name.c_str());
  if (!meta.ok()) die_on(kExitLoad, name, "cannot read metadata of method " + name + ": " + describe(meta.error()));
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    auto size = meta->memory_planned_buffer_size(i);
    if (!size.ok()) die_on(kExitLoad, name, "cannot read planned buffer " + std::to_string(i) + " of method " + name + ": " + describe(size.error()));
    lm->planned.emplace_back((uint8_t*)aligned_malloc((size_t)size.get(), 64));
    if (!lm->planned.back()) die_on(kExitLoad, name, "out of memory for planned buffer of method " + name);
    lm->spans.emplace_back(lm->planned.back().get(), (size_t)size.get());
  }
  lm->planned_memory = std::make_unique<et::HierarchicalAllocator>(et::Span<et::Span<uint8_t>>(lm->spans.data(), lm->spans.size()));
  lm->memory_manager = std::make_unique<et::MemoryManager>(&lm->method_allocator, lm->planned_memory.get(), &lm->temp_allocator);
  auto t_load = std::chrono::steady_clock::now();
  lm->method.reset(new et::Result<et::Method>(program.load_method(name.c_str(), lm->memory_manager.get())));
  if (!lm->method->ok()) die_on(kExitLoad, name, "cannot load method " + name + ": " + describe(lm->method->error()));
  lm->load_ms = ms_since(t_load);
  set_phase(kExitExec, "setting the inputs of method " + name);
  lm->inputs = set_inputs(**lm->method, *meta, name);
  return lm;
}

void warm(LoadedMethod& lm, long n) {
  set_phase(kExitExec, "executing method " + lm.name);
  for (long i = 0; i < n; ++i) {
    Error err = (*lm.method)->execute();
    if (err != Error::Ok) die_on(kExitExec, lm.name, "execution of method " + lm.name + " failed (warmup " + std::to_string(i) + "): " + describe(err));
  }
}

double time_once(LoadedMethod& lm) {
  set_phase(kExitExec, "executing method " + lm.name);
  auto t0 = std::chrono::steady_clock::now();
  Error err = (*lm.method)->execute();
  auto t1 = std::chrono::steady_clock::now();
  if (err != Error::Ok) die_on(kExitExec, lm.name, "execution of method " + lm.name + " failed (iteration " + std::to_string(lm.us.size()) + "): " + describe(err));
  double x = std::chrono::duration<double, std::micro>(t1 - t0).count();
  lm.us.push_back(x);
  lm.timed_ms += x / 1000.0;
  return x;
}

// Distribution-free 95 % confidence interval of a median (order statistics
// n/2 -+ 0.98 sqrt(n)), as a half-width relative to the median; 1e9 when too few samples.
double median_ci_rel(std::vector<double> v) {
  size_t n = v.size();
  if (n < 6) return 1e9;
  std::sort(v.begin(), v.end());
  double half = 0.98 * std::sqrt((double)n);
  long lo = (long)std::floor(n / 2.0 - half);
  long hi = (long)std::ceil(n / 2.0 + half);
  if (lo < 0) lo = 0;
  if (hi > (long)n - 1) hi = (long)n - 1;
  double med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  if (!(med > 0)) return 1e9;
  return (v[(size_t)hi] - v[(size_t)lo]) / (2.0 * med);
}

// What the convergence test is about: the ratio to the reference (the drift-free
// quantity) when there is one, the raw samples otherwise.
double ci_of(const LoadedMethod& lm) {
  if (lm.reference_us.empty()) return median_ci_rel(lm.us);
  std::vector<double> r(lm.us.size());
  for (size_t i = 0; i < r.size(); ++i) r[i] = lm.reference_us[i] > 0 ? lm.us[i] / lm.reference_us[i] : 0.0;
  return median_ci_rel(r);
}

struct RoundInfo {  // interleaved mode only
  bool on = false;
  long group = -1;
  long rounds = 0;
  double ci_rel = -1.0;  // < 0: not computed
  bool converged = true;
  const std::string* reference = nullptr;
  bool is_reference = false;
};

void print_record(const LoadedMethod& lm, const Args& args, const RunInfo& run, const RoundInfo& ri) {
  std::string line = "{\"method\": " + json_str(lm.name) + ", \"iterations_us\": [";
  for (size_t i = 0; i < lm.us.size(); ++i) {
    if (i) line += ", ";
    line += fmt(lm.us[i]);
  }
  line += "], \"load_ms\": " + fmt(lm.load_ms);
  line += ", \"threads\": " + std::to_string(args.threads ? (size_t)args.threads : run.pool_threads);
  line += ", \"affinity\": " + (args.affinity.empty() ? std::string("null") : json_str(args.affinity));
  line += ", \"warmup\": " + std::to_string(args.warmup);
  line += ", \"runtime_version\": " + json_str(ET_BENCH_RUNTIME_VERSION);
  // Extras (not in the contract; parsers ignore them): what really applied.
  line += ", \"pool_threads\": " + std::to_string(run.pool_threads);
  line += ", \"affinity_effective\": " + json_str(run.affinity_effective);
  if (ri.on) {
    line += ", \"interleaved\": true, \"seed\": " + std::to_string(args.seed);
    line += ", \"group\": " + std::to_string(ri.group) + ", \"rounds\": " + std::to_string(ri.rounds);
    line += ", \"reference\": " + (ri.reference ? json_str(*ri.reference) : std::string("null"));
    if (ri.is_reference) line += ", \"is_reference\": true";
    if (!lm.reference_us.empty()) {
      line += ", \"reference_us\": [";
      for (size_t i = 0; i < lm.reference_us.size(); ++i) {
        if (i) line += ", ";
        line += fmt(lm.reference_us[i]);
      }
      line += "]";
    }
    if (ri.ci_rel >= 0) {
      char buf[64];
      snprintf(buf, sizeof(buf), "%.5f", std::min(ri.ci_rel, 1e6));
      line += std::string(", \"ci_rel\": ") + buf;
      line += std::string(", \"converged\": ") + (ri.converged ? "true" : "false");
    }
  }
  line += "}\n";
  fputs(line.c_str(), stdout);
  fflush(stdout);
}

// A hard cap so a tiny method with a large --min_time_ms cannot emit gigabytes.
const size_t kMaxSamples = 2000000;

void bench_method(const et::Program& program, const std::string& name, const Args& args, const RunInfo& run) {
  auto lm = load_for_bench(program, name);
  warm(*lm, args.warmup);
  lm->us.reserve((size_t)args.iterations);
  while ((long)lm->us.size() < args.iterations || (lm->timed_ms < args.min_time_ms && lm->us.size() < kMaxSamples)) {
    time_once(*lm);
  }
  print_record(*lm, args, run, RoundInfo{});
}

// Interleaved rounds: the selection is split into groups of at most --group
// methods (memory stays bounded); a group's methods are loaded together and
// timed in rounds, each round running every method once in a seeded shuffled
// order, so a slow stretch of the device lands on all of them alike. The
// reference (when given) is loaded once and runs in every round of every group;
// each method's record carries the reference's sample of the same round.
void bench_interleaved(const et::Program& program, const std::vector<std::string>& selected, const Args& args,
                       const RunInfo& run) {
  std::unique_ptr<LoadedMethod> ref;
  bool ref_selected = false;
  std::vector<std::string> work;
  if (!args.reference.empty()) {
    ref = load_for_bench(program, args.reference);
    warm(*ref, args.warmup);
    for (const auto& m : selected) {
      if (m == args.reference) ref_selected = true;
      else work.push_back(m);
    }
  } else {
    work = selected;
  }
  size_t group = args.group > 0 ? (size_t)args.group : work.size();
  if (group == 0) group = 1;
  Rng rng((uint64_t)args.seed * 0x9E3779B97F4A7C15ull + 1);
  long gi = 0;
  for (size_t start = 0; start < work.size(); start += group, ++gi) {
    std::vector<std::unique_ptr<LoadedMethod>> ms;
    for (size_t i = start; i < std::min(work.size(), start + group); ++i) ms.push_back(load_for_bench(program, work[i]));
    for (auto& m : ms) warm(*m, args.warmup);
    // A method leaves the rounds once it has what it needs (--iterations, --min_time_ms, and with
    // --ci_target a converged CI), so a 2 us unit needing 30 ms timed does not drag a 1 ms unit
    // through 15000 rounds; the reference runs in every round while any method is still in.
    std::vector<bool> done(ms.size(), false);
    std::vector<double> cis(ms.size(), -1.0);
    long rounds = 0;
    double group_timed_ms = 0.0;
    std::vector<long> order;
    while (true) {
      bool capped = args.ci_target > 0 && group_timed_ms >= args.max_time_ms;
      bool check_ci = rounds % 5 == 0 || capped;
      order.clear();
      for (size_t i = 0; i < ms.size(); ++i) {
        if (done[i]) continue;
        const auto& m = *ms[i];
        bool more = (long)m.us.size() < args.iterations ||
                    (m.span_ms < args.min_time_ms && m.us.size() < kMaxSamples);
        if (!more && args.ci_target > 0) {
          if (check_ci) cis[i] = ci_of(m);
          more = !capped && m.us.size() < kMaxSamples && !(cis[i] >= 0 && cis[i] <= args.ci_target);
        }
        if (more) order.push_back((long)i);
        else done[i] = true;
      }
      if (order.empty()) break;
      if (ref) order.push_back(-1);
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.next() % i]);  // Fisher-Yates
      double ref_x = 0.0;
      auto t_round = std::chrono::steady_clock::now();
      for (long k : order) {
        warm(k < 0 ? *ref : *ms[(size_t)k], args.rewarm);
        if (k < 0) {
          ref_x = time_once(*ref);
          group_timed_ms += ref_x / 1000.0;
        } else {
          group_timed_ms += time_once(*ms[(size_t)k]) / 1000.0;
        }
      }
      double round_ms = ms_since(t_round);
      for (long k : order) {
        if (k < 0) continue;
        ms[(size_t)k]->span_ms += round_ms;
        if (ref) ms[(size_t)k]->reference_us.push_back(ref_x);
      }
      ++rounds;
    }
    for (size_t i = 0; i < ms.size(); ++i) {
      RoundInfo ri;
      ri.on = true;
      ri.group = gi;
      ri.rounds = (long)ms[i]->us.size();  // the rounds this method took part in
      ri.reference = ref ? &args.reference : nullptr;
      if (args.ci_target > 0) {
        ri.ci_rel = cis[i] >= 0 ? cis[i] : ci_of(*ms[i]);
        ri.converged = ri.ci_rel <= args.ci_target;
      }
      print_record(*ms[i], args, run, ri);
    }
  }
  if (ref && ref_selected) {
    if (work.empty()) {  // the reference alone: time it in rounds of its own
      while ((long)ref->us.size() < args.iterations || (ref->timed_ms < args.min_time_ms && ref->us.size() < kMaxSamples)) time_once(*ref);
    }
    RoundInfo ri;
    ri.on = true;
    ri.group = -1;
    ri.rounds = (long)ref->us.size();
    ri.reference = &args.reference;
    ri.is_reference = true;
    if (args.ci_target > 0) {
      ri.ci_rel = median_ci_rel(ref->us);
      ri.converged = ri.ci_rel <= args.ci_target;
    }
    print_record(*ref, args, run, ri);
  }
}

}  // namespace

int main(int argc, char** argv) {
  install_signal_handlers();
  g_verbose = getenv("ET_BENCH_VERBOSE") != nullptr;
  install_pal();
  Args args = parse_args(argc, argv);

  // Affinity before anything starts threads, so that the pool inherits it.
  if (!args.affinity.empty()) apply_affinity(args.affinity);

  et::runtime_init();
  set_phase(kExitLoad, "loading program " + args.model_path);
  auto loader = read_file(args.model_path);
  auto program = et::Program::load(loader.get(), et::Program::Verification::InternalConsistency);
  if (!program.ok()) die(kExitLoad, "cannot load program " + args.model_path + ": " + describe(program.error()) + " (not a valid .pte?)");

  std::vector<std::string> all;
  for (size_t i = 0; i < program->num_methods(); ++i) {
    auto name = program->get_method_name(i);
    if (!name.ok()) die(kExitLoad, "cannot read method " + std::to_string(i) + " of " + args.model_path + ": " + describe(name.error()));
    all.emplace_back(name.get());
  }
  if (args.list) {
    std::string line = "{\"methods\": [";
    for (size_t i = 0; i < all.size(); ++i) line += (i ? ", " : "") + json_str(all[i]);
    fputs((line + "]}\n").c_str(), stdout);
    fflush(stdout);
    return 0;
  }
  std::vector<std::string> selected = args.methods_given ? args.methods : all;
  for (const auto& m : selected) {
    if (std::find(all.begin(), all.end(), m) == all.end()) {
      std::string have;
      // Quoted only when a name would not read plainly in a comma-separated list.
      for (size_t i = 0; i < all.size(); ++i) {
        bool plain = !all[i].empty() && all[i].find(',') == std::string::npos;
        have += (i ? "," : "") + (plain ? all[i] : json_str(all[i]));
      }
      die(kExitUsage, "unknown method '" + m + "' in " + args.model_path + "; it has: " + have);
    }
  }

  // XNNPACK takes the pthreadpool when a method is loaded (delegate init),
  // so the pool gets its size now, before any load_method.
  auto* pool = ::executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) die(kExitLoad, "the ExecuTorch threadpool is unavailable");
  if (args.threads > 0) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    if (!pool->_unsafe_reset_threadpool((uint32_t)args.threads)) {
      die(kExitLoad, "cannot resize the threadpool to " + std::to_string(args.threads) + " threads");
    }
#pragma GCC diagnostic pop
  }
  RunInfo run{pool->get_thread_count(), effective_affinity()};

  if (args.reference_given && std::find(all.begin(), all.end(), args.reference) == all.end()) {
    die(kExitUsage, "unknown reference method '" + args.reference + "' in " + args.model_path);
  }
  g_interleaved = args.interleave;
  if (args.interleave) {
    bench_interleaved(*program, selected, args, run);
  } else {
    for (const auto& m : selected) bench_method(*program, m, args, run);
  }
  return 0;
}
