// cliptune_ort's custom-op library: ai.cliptune.FusedDense, a dense layer whose bias and activation
// run in the GEMM's epilogue, and ai.cliptune.RaggedAttention, cuDNN's fused attention on packed rows
// (further down), with cliptune's own kernels for short rows as its impl = 1 and 2 (short_attention.cu), and
// ai.cliptune.PackAdd, the packed first-layer input of a "packed_host" graph in one pass (pack_add.cu).
//
//   Y = act(X @ W + B [+ R])     X [..., K], W [K, N], B [N], optional R [..., N]  ->  Y [..., N]
//   activation (string attribute): "none" | "gelu_tanh"
//   R (optional 4th input): a residual added inside the epilogue, before the activation (cuBLASLt's
//   D = act(A B + beta C + bias) with C = R, beta = 1), so a post-LN transformer's "projection + residual"
//   is one GEMM and the LayerNormalization after it reads one tensor instead of two.
//     gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (cuBLASLt's GELU epilogue)
//
// Why: on a CUDA fp16 graph, ONNX Runtime runs MatMul and then BiasGelu (or Add) as separate kernels,
// so the [tokens, 4 * hidden] feed-forward intermediate is written, read and written again. cuBLASLt's
// CUBLASLT_EPILOGUE_GELU_BIAS / _BIAS apply both inside the GEMM (README, GPU section, for the time it
// costs: 7.7 of 60 ms per stacked call on an H100 before this op).
//
// Two builds of this one file (cliptune_ort/native.py builds them):
// - CUDA (-DCLIPTUNE_CUDA; links cuBLASLt): the op on CUDAExecutionProvider, float16 in and out,
//   float32 accumulation, on the provider's compute stream; no allocation or synchronisation after the
//   first call of a shape, so ONNX Runtime can capture it in a CUDA graph.
// - CPU (no CUDA at all): the same op on CPUExecutionProvider in float32, a plain loop. It exists so the
//   library's ONNX Runtime glue (inputs, shapes, attribute, registration) and the graph rewrite are
//   tested on machines without a GPU, against numpy.
//
// Built against ONNX Runtime's C++ header API (API version of the headers; any newer runtime accepts it).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef CLIPTUNE_CUDA
#include <cublasLt.h>
#include <cuda_runtime.h>
#ifdef CLIPTUNE_CUDNN
// cuDNN is loaded at the first RaggedAttention call (dlopen), not linked: a library built with it still
// loads, and its FusedDense runs, where no cuDNN is installed
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#include <dlfcn.h>
#include <cudnn.h>
#include <cudnn_frontend.h>
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;  // the frontend's handle on libcudnn (its dynamic-loading mode)
}  // namespace cudnn_frontend
#endif
#ifdef CLIPTUNE_SHORT_ATTN
// short_attention.cu (compiled by nvcc, linked in): 0 launched, 1 a shape it does not handle, 2 launch failed
extern "C" int cliptune_short_attention(const void* q, const void* k, const void* v, int64_t in_ld, void* o,
                                        const int32_t* seq_len, const int32_t* ragged, int rows, int heads,
                                        int hidden, int max_seq, float scale, int pipelined, const int32_t* token_rows,
                                        const void* q_bias, cudaStream_t stream);
#endif
#ifdef CLIPTUNE_PACK_ADD
// pack_add.cu (compiled by nvcc, linked in)
extern "C" int cliptune_pack_add(const void* a, const void* p, const int64_t* index, void* y, int64_t tokens,
                                 int64_t pop, int64_t batch, int64_t seq, int64_t hidden, cudaStream_t stream);
#endif  // 0 launched, 1 too many rows for one launch, 2 launch failed
#if defined(CLIPTUNE_CUDNN) || defined(CLIPTUNE_SHORT_ATTN)
#define CLIPTUNE_ATTN_CUDA  // the CUDA RaggedAttention: cuDNN's kernel (impl 0), cliptune's short-row ones (1, 2)
#endif
#endif

namespace {

constexpr const char* kDomain = "ai.cliptune";
constexpr const char* kOpName = "FusedDense";

enum class Act { kNone, kGeluTanh };

Act ParseActivation(const OrtKernelInfo* info) {
  Ort::ConstKernelInfo ki(info);
  std::string a = ki.GetAttribute<std::string>("activation");
  if (a == "none") return Act::kNone;
  if (a == "gelu_tanh") return Act::kGeluTanh;
  ORT_CXX_API_THROW("FusedDense: activation must be 'none' or 'gelu_tanh', got '" + a + "'",
                    ORT_INVALID_ARGUMENT);
}

// The GEMM sizes of one call: rows M (all leading dims of X), K, N; and the output shape.
struct Dims {
  int64_t m = 1, k = 0, n = 0;
  std::vector<int64_t> y_shape;
};

Dims CheckDims(const Ort::ConstValue& x, const Ort::ConstValue& w, const Ort::ConstValue& b,
               const std::vector<int64_t>* r_shape) {
  auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
  auto ws = w.GetTensorTypeAndShapeInfo().GetShape();
  auto bs = b.GetTensorTypeAndShapeInfo().GetShape();
  if (xs.empty() || ws.size() != 2 || bs.size() != 1 || xs.back() != ws[0] || bs[0] != ws[1]) {
    auto str = [](const std::vector<int64_t>& s) {
      std::string r = "[";
      for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
      return r + "]";
    };
    ORT_CXX_API_THROW("FusedDense: expected X [..., K], W [K, N], B [N]; got X " + str(xs) + ", W " + str(ws) +
                          ", B " + str(bs),
                      ORT_INVALID_ARGUMENT);
  }
  Dims d;
  for (size_t i = 0; i + 1 < xs.size(); ++i) d.m *= xs[i];
  d.k = ws[0];
  d.n = ws[1];
  d.y_shape = xs;
  d.y_shape.back() = d.n;
  if (r_shape != nullptr && *r_shape != d.y_shape) {
    ORT_CXX_API_THROW("FusedDense: the residual R must have the output's shape [..., N]", ORT_INVALID_ARGUMENT);
  }
  return d;
}

// The optional residual input (4th), or nullptr where the node has none.
bool HasResidual(Ort::KernelContext& ctx) {
  if (ctx.GetInputCount() < 4) return false;
  return static_cast<const OrtValue*>(ctx.GetInput(3)) != nullptr;
}

// Runs ``f``; an exception becomes the OrtStatus ONNX Runtime reports (nothing may cross the C API).
template <typename F>
OrtStatusPtr AsStatus(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION).release();
  }
}

// One call: inputs checked, the output allocated, then ``f(ctx, x, w, b, r, y, d)`` (r: the residual's data or
// nullptr); errors as an OrtStatus.
template <typename F>
OrtStatusPtr RunDense(OrtKernelContext* context, F&& f) {
  return AsStatus([&] {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(0), w = ctx.GetInput(1), b = ctx.GetInput(2);
    const bool has_r = HasResidual(ctx);
    const void* r_data = nullptr;
    std::vector<int64_t> r_shape;
    if (has_r) {
      auto r = ctx.GetInput(3);
      r_shape = r.GetTensorTypeAndShapeInfo().GetShape();
      r_data = r.GetTensorRawData();
    }
    Dims d = CheckDims(x, w, b, has_r ? &r_shape : nullptr);
    auto y = ctx.GetOutput(0, d.y_shape);
    f(ctx, x, w, b, r_data, y, d);
  });
}

// What the library's ops share: the kernel made from the node's attributes, the provider (nullptr: the CPU
// provider), one output of the element type. ``Op`` is the op itself (CustomOpBase finds its methods there).
template <typename Op, typename Kernel, ONNXTensorElementDataType kType>
struct OpCommon : Ort::CustomOpBase<Op, Kernel, true> {
  explicit OpCommon(const char* provider) : provider_(provider) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return AsStatus([&] { *kernel = new Kernel(info); });
  }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }

 private:
  const char* provider_;
};

// The op, for one kernel type (the CPU or the CUDA implementation), element type and provider.
template <typename Kernel, ONNXTensorElementDataType kType>
struct DenseOp : OpCommon<DenseOp<Kernel, kType>, Kernel, kType> {
  explicit DenseOp(const char* provider) : OpCommon<DenseOp<Kernel, kType>, Kernel, kType>(provider) {}
  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return kType; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;  // the residual
  }
};

inline float GeluTanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
}

// ---------------------------------------------------------------------------------------------- CPU
struct DenseCpuKernel {
  explicit DenseCpuKernel(const OrtKernelInfo* info) : act(ParseActivation(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return RunDense(context, [&](Ort::KernelContext&, const Ort::ConstValue& x, const Ort::ConstValue& w,
                                 const Ort::ConstValue& b, const void* r, Ort::UnownedValue& y, const Dims& d) {
      const float* X = x.GetTensorData<float>();
      const float* W = w.GetTensorData<float>();
      const float* B = b.GetTensorData<float>();
      const float* R = static_cast<const float*>(r);
      float* Y = y.GetTensorMutableData<float>();
      std::vector<float> row(static_cast<size_t>(d.n));
      for (int64_t m = 0; m < d.m; ++m) {
        for (int64_t n = 0; n < d.n; ++n) row[n] = B[n] + (R ? R[m * d.n + n] : 0.0f);
        for (int64_t k = 0; k < d.k; ++k) {
          const float xv = X[m * d.k + k];
          const float* wr = W + k * d.n;
          for (int64_t n = 0; n < d.n; ++n) row[n] += xv * wr[n];
        }
        for (int64_t n = 0; n < d.n; ++n) Y[m * d.n + n] = act == Act::kGeluTanh ? GeluTanh(row[n]) : row[n];
      }
    });
  }

  Act act;
};

using DenseCpuOp = DenseOp<DenseCpuKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>;

#ifdef CLIPTUNE_CUDA
// --------------------------------------------------------------------------------------------- CUDA
std::string LtError(const char* what, cublasStatus_t s) {
  return std::string("FusedDense: ") + what + " failed with cuBLAS status " + std::to_string(static_cast<int>(s));
}
#define LT_CHECK(call)                                                   \
  do {                                                                   \
    cublasStatus_t s_ = (call);                                          \
    if (s_ != CUBLAS_STATUS_SUCCESS) ORT_CXX_API_THROW(LtError(#call, s_), ORT_RUNTIME_EXCEPTION); \
  } while (0)

constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // NVIDIA's suggestion for Hopper

// One cuBLASLt handle for the process (it holds no stream and no workspace).
struct LtHandleHolder {
  cublasLtHandle_t handle = nullptr;
  cublasStatus_t status = cublasLtCreate(&handle);
};

cublasLtHandle_t LtHandle() {
  static LtHandleHolder holder;  // made once, thread-safe (a function-local static)
  if (holder.status != CUBLAS_STATUS_SUCCESS) {
    ORT_CXX_API_THROW(LtError("cublasLtCreate", holder.status), ORT_RUNTIME_EXCEPTION);
  }
  return holder.handle;
}

// How many of cuBLASLt's heuristic candidates a new GEMM shape times before it picks one:
// $CLIPTUNE_FUSED_DENSE_ALGOS (default 1 = the heuristic's first, no timing; at most 32). Timing runs
// the candidates on the call's own inputs (3 runs each, CUDA events), on the first call of a shape only,
// never while the stream is being captured. $CLIPTUNE_FUSED_DENSE_VERBOSE=1 prints each choice to stderr.
int AlgoCandidates() {
  const char* v = std::getenv("CLIPTUNE_FUSED_DENSE_ALGOS");
  int n = v ? std::atoi(v) : 1;
  return n < 1 ? 1 : (n > 32 ? 32 : n);
}

bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone;
}

// One workspace per stream (kernels on one stream run one after another), made on first use. A stream
// that is being captured into a CUDA graph gets none made (ONNX Runtime runs a graph's kernels once
// before it captures them, so the workspace exists by then); if it still has none, the GEMM runs
// without workspace.
struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

Workspace WorkspaceFor(cudaStream_t stream) {
  static std::mutex mu;
  static std::map<cudaStream_t, Workspace> by_stream;
  std::lock_guard<std::mutex> lock(mu);
  auto it = by_stream.find(stream);
  if (it != by_stream.end()) return it->second;
  if (Capturing(stream)) return Workspace{};
  Workspace ws;
  if (cudaMalloc(&ws.ptr, kWorkspaceBytes) != cudaSuccess) {
    cudaGetLastError();  // clear it: run without workspace
    ws.ptr = nullptr;
  } else {
    ws.bytes = kWorkspaceBytes;
  }
  by_stream[stream] = ws;  // kept for the life of the process (a few per process)
  return ws;
}

// The descriptors and chosen algorithm of one GEMM shape, made once. Row-major Y [M, N] is
// column-major Y^T [N, M] = W^T [N, K] (W row-major, ld N) x X^T [K, M] (X row-major, ld K), so the
// bias (length N) runs along the rows of cuBLASLt's D, as its epilogue expects.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t w = nullptr, x = nullptr, y = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (y) cublasLtMatrixLayoutDestroy(y);
    if (x) cublasLtMatrixLayoutDestroy(x);
    if (w) cublasLtMatrixLayoutDestroy(w);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct DenseCudaKernel {
  explicit DenseCudaKernel(const OrtKernelInfo* info) : act(ParseActivation(info)) {}

  // The GEMM's operands, for timing candidate algorithms on the first call of a shape.
  struct Operands {
    const void* x;
    const void* w;
    const void* bias;
    void* y;
    Workspace ws;
    cudaStream_t stream;
  };

  Plan& PlanFor(const Dims& d, const Operands& io) {
    const size_t workspace = io.ws.bytes;
    auto key = std::make_tuple(d.m, d.k, d.n, workspace);
    auto it = plans.find(key);
    if (it != plans.end()) return *it->second;
    auto p = std::make_unique<Plan>();
    LT_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t no = CUBLAS_OP_N;
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &no, sizeof(no)));
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &no, sizeof(no)));
    cublasLtEpilogue_t epi = act == Act::kGeluTanh ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
    LT_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->w, CUDA_R_16F, d.n, d.k, d.n));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->x, CUDA_R_16F, d.k, d.m, d.k));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p->y, CUDA_R_16F, d.n, d.m, d.n));
    cublasLtMatmulPreference_t pref = nullptr;
    LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                         sizeof(workspace));
    const int want = AlgoCandidates();
    std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(want));
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(LtHandle(), p->op, p->w, p->x, p->y, p->y, pref, want,
                                                      results.data(), &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
      ORT_CXX_API_THROW("FusedDense: cuBLASLt has no fp16 algorithm with this epilogue for M=" + std::to_string(d.m) +
                            " K=" + std::to_string(d.k) + " N=" + std::to_string(d.n) + " (status " +
                            std::to_string(static_cast<int>(s)) + ")",
                        ORT_RUNTIME_EXCEPTION);
    }
    int best = 0;
    if (found > 1 && !Capturing(io.stream)) best = FastestAlgo(*p, d, io, results, found);
    p->algo = results[static_cast<size_t>(best)].algo;
    Plan& ref = *p;
    plans.emplace(key, std::move(p));
    return ref;
  }

  // The candidate with the least time over 3 runs (after one untimed run); 0 when none can be timed.
  int FastestAlgo(Plan& p, const Dims& d, const Operands& io, const std::vector<cublasLtMatmulHeuristicResult_t>& rs,
                  int found) {
    const float alpha = 1.0f, beta = 0.0f;
    if (cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &io.bias, sizeof(io.bias)) !=
        CUBLAS_STATUS_SUCCESS) {
      return 0;
    }
    cudaEvent_t start = nullptr, stop = nullptr;
    if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    int best = 0;
    float best_ms = -1.0f;
    std::string report;
    for (int i = 0; i < found; ++i) {
      const auto& r = rs[static_cast<size_t>(i)];
      if (r.workspaceSize > io.ws.bytes) continue;
      auto run = [&] {
        return cublasLtMatmul(LtHandle(), p.op, &alpha, io.w, p.w, io.x, p.x, &beta, io.y, p.y, io.y, p.y, &r.algo,
                              io.ws.ptr, io.ws.bytes, io.stream);
      };
      if (run() != CUBLAS_STATUS_SUCCESS) continue;
      cudaEventRecord(start, io.stream);
      bool ok = true;
      for (int k = 0; k < 3 && ok; ++k) ok = run() == CUBLAS_STATUS_SUCCESS;
      cudaEventRecord(stop, io.stream);
      float ms = 0.0f;
      if (!ok || cudaEventSynchronize(stop) != cudaSuccess || cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) {
        cudaGetLastError();
        continue;
      }
      report += " " + std::to_string(i) + ":" + std::to_string(ms / 3.0f);
      if (best_ms < 0.0f || ms < best_ms) {
        best_ms = ms;
        best = i;
      }
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    const char* verbose = std::getenv("CLIPTUNE_FUSED_DENSE_VERBOSE");
    if (verbose && verbose[0] == '1') {
      std::fprintf(stderr, "[FusedDense] M=%lld K=%lld N=%lld: algorithm %d of %d (ms per run:%s)\n",
                   static_cast<long long>(d.m), static_cast<long long>(d.k), static_cast<long long>(d.n), best, found,
                   report.c_str());
    }
    return best;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return RunDense(context, [&](Ort::KernelContext& ctx, const Ort::ConstValue& x, const Ort::ConstValue& w,
                                 const Ort::ConstValue& b, const void* r, Ort::UnownedValue& y, const Dims& d) {
      if (d.m == 0 || d.n == 0) return;
      auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
      std::lock_guard<std::mutex> lock(mu);
      const void* bias = b.GetTensorRawData();
      void* out = y.GetTensorMutableRawData();
      Operands io{x.GetTensorRawData(), w.GetTensorRawData(), bias, out, WorkspaceFor(stream), stream};
      Plan& p = PlanFor(d, io);
      LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
      // with a residual: C = R (the output's layout), beta = 1, added before the epilogue's bias/activation
      const float alpha = 1.0f, beta = r ? 1.0f : 0.0f;
      const void* c = r ? r : out;
      LT_CHECK(cublasLtMatmul(LtHandle(), p.op, &alpha, io.w, p.w, io.x, p.x, &beta, c, p.y, out, p.y, &p.algo,
                              io.ws.ptr, io.ws.bytes, stream));
    });
  }

  Act act;
  std::mutex mu;
  std::map<std::tuple<int64_t, int64_t, int64_t, size_t>, std::unique_ptr<Plan>> plans;
};

using DenseCudaOp = DenseOp<DenseCudaKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>;
#endif  // CLIPTUNE_CUDA

// ------------------------------------------------------------------------------- RaggedAttention
//
//   O = softmax(Q K^T * scale) V within each packed row:   Q, K, V, O [tokens, heads * head]
//   seq_len int32 [rows]: each row's tokens; ragged int32 [rows + 1]: where each row starts, in elements
//   (token offset * heads * head); token_offset int32 [rows, seq]: only its shape is read (rows, the longest
//   row). Attributes: num_heads, scale (0: 1 / sqrt(head)), impl (optional; 0 = cuDNN's fused attention,
//   1 = cliptune's kernels for head size 64, short_attention.cu: rows of at most 128 tokens in shared memory,
//   longer ones on a plain fallback; other head sizes go to cuDNN where the build has it; 2 = impl 1 with the
//   short rows pipelined, two (row, head) items per block in flight), qkv (optional; 1: inputs 0, 1 and 2 are
//   one [tokens, 3 * heads * head] tensor, a single QKV projection, read in place; impl 1 or 2 only). The CPU
//   build ignores impl.
//   token_rows (optional 7th input, int32 [tokens]; impl 1 or 2): token t's Q, K and V are row token_rows[t] of
//   inputs 0-2, which may then hold fewer rows than O ([in_rows, ...]). A packed first layer whose rows share
//   their first positions (the [CLS] and prompt positions of one candidate) projects those once per candidate
//   and points every row's prefix tokens at them.
//   q_bias (optional 8th input, [heads * head] of Q's type; impl 1 or 2): added to Q first, so the projection
//   before the op runs without a bias epilogue (run 10 on an H100: the biased QKV projection at about 655 TFLOP/s,
//   the plain projections of the same call at about 700).
//
// Why: ONNX Runtime's PackedMultiHeadAttention runs FlashAttention's 128 x 128 tiles on rows of about 70
// tokens (6.9 of 53 ms of a stacked call on an H100, run 7); cuDNN's fused attention for Hopper takes the
// packed ("THD", ragged-offset) layout straight (cuDNN >= 9.1, sm90). Built with -DCLIPTUNE_CUDNN (cuDNN and
// cudnn-frontend headers); the CPU build has a plain loop for the tests.

constexpr const char* kAttnName = "RaggedAttention";

struct AttnDims {
  int64_t tokens = 0, hidden = 0, rows = 0, seq = 0, heads = 0, head = 0;
  int64_t in_rows = 0;                 // rows of Q, K and V: tokens, or fewer with token_rows
  const int32_t* token_rows = nullptr;  // the optional 7th input: token t reads row token_rows[t]
  bool q_bias = false;                  // the optional 8th input: a query bias [hidden]
  int64_t in_ld = 0;  // row stride of Q, K and V: hidden, or 3 * hidden for one QKV tensor (qkv = 1)
  float scale = 0.0f;
};

AttnDims CheckAttn(Ort::KernelContext& ctx, int64_t heads, float scale, bool qkv) {
  auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
  auto q = shape(0), k = shape(1), v = shape(2), len = shape(3), rag = shape(4), off = shape(5);
  const int64_t parts = qkv ? 3 : 1;
  const bool mapped = ctx.GetInputCount() > 6 && static_cast<const OrtValue*>(ctx.GetInput(6)) != nullptr;
  const std::vector<int64_t> map = mapped ? shape(6) : std::vector<int64_t>{};
  if (mapped && map.size() != 1) {
    ORT_CXX_API_THROW("RaggedAttention: expected token_rows int32 [tokens] (7th input)", ORT_INVALID_ARGUMENT);
  }
  const bool biased = ctx.GetInputCount() > 7 && static_cast<const OrtValue*>(ctx.GetInput(7)) != nullptr;
  if (q.size() != 2 || k != q || v != q || len.size() != 1 || rag.size() != 1 || off.size() != 2 ||
      rag[0] != len[0] + 1 || off[0] != len[0] || heads <= 0 || q[1] % (heads * parts) != 0) {
    ORT_CXX_API_THROW(std::string("RaggedAttention: expected Q, K, V [tokens, ") + (qkv ? "3 * " : "") +
                          "heads * head]" + (qkv ? " (one QKV tensor, qkv = 1)" : "") +
                          ", seq_len [rows], ragged [rows + 1], token_offset [rows, seq] and num_heads dividing the "
                          "hidden size",
                      ORT_INVALID_ARGUMENT);
  }
  AttnDims d;
  d.in_rows = q[0];
  d.tokens = mapped ? map[0] : q[0];
  d.token_rows = mapped ? ctx.GetInput(6).GetTensorData<int32_t>() : nullptr;
  d.q_bias = biased;
  d.in_ld = q[1];
  d.hidden = q[1] / parts;
  d.rows = len[0];
  d.seq = off[1];
  d.heads = heads;
  d.head = d.hidden / heads;
  d.scale = scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(d.head));
  if (biased && shape(7) != std::vector<int64_t>{d.hidden}) {
    ORT_CXX_API_THROW("RaggedAttention: expected q_bias [" + std::to_string(d.hidden) + "] (8th input)",
                      ORT_INVALID_ARGUMENT);
  }
  if (d.tokens * d.hidden > INT32_MAX) {
    ORT_CXX_API_THROW("RaggedAttention: more than 2^31 elements (int32 ragged offsets)", ORT_INVALID_ARGUMENT);
  }
  return d;
}

template <typename Kernel, ONNXTensorElementDataType kType>
struct AttnOp : OpCommon<AttnOp<Kernel, kType>, Kernel, kType> {
  explicit AttnOp(const char* provider) : OpCommon<AttnOp<Kernel, kType>, Kernel, kType>(provider) {}
  const char* GetName() const { return kAttnName; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // Q, K, V; seq_len, ragged, token_offset, token_rows; q_bias
    return i < 3 || i == 7 ? kType : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 6 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;  // token_rows, q_bias
  }
};

// An optional int attribute: its value, 0 where the node has none
int64_t OptionalInt(const Ort::ConstKernelInfo& ki, const char* name) {
  try {
    return ki.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return 0;
  }
}

struct AttnAttrs {
  int64_t heads;
  float scale;
  int64_t impl = 0;
  bool qkv = false;
  explicit AttnAttrs(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    heads = ki.GetAttribute<int64_t>("num_heads");
    scale = ki.GetAttribute<float>("scale");
    impl = OptionalInt(ki, "impl");  // graphs of export format 3 have none: cuDNN
    if (impl < 0 || impl > 2) {
      ORT_CXX_API_THROW("RaggedAttention: impl must be 0 (cuDNN), 1 (cliptune's short-row kernel) or 2 (the same, "
                        "pipelined), got " +
                            std::to_string(impl),
                        ORT_INVALID_ARGUMENT);
    }
    const int64_t packed = OptionalInt(ki, "qkv");  // Q, K and V as one [tokens, 3 * hidden] tensor
    if ((packed != 0 && packed != 1) || (packed == 1 && impl == 0)) {
      ORT_CXX_API_THROW("RaggedAttention: qkv must be 0 or 1, and 1 (one QKV tensor) needs impl 1 or 2, got qkv " +
                            std::to_string(packed) + " with impl " + std::to_string(impl),
                        ORT_INVALID_ARGUMENT);
    }
    qkv = packed == 1;
  }
};

struct AttnCpuKernel : AttnAttrs {
  explicit AttnCpuKernel(const OrtKernelInfo* info) : AttnAttrs(info) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return AsStatus([&] {
      Ort::KernelContext ctx(context);
      AttnDims d = CheckAttn(ctx, heads, scale, qkv);
      const float* Q = ctx.GetInput(0).GetTensorData<float>();
      const float* K = ctx.GetInput(1).GetTensorData<float>() + (qkv ? d.hidden : 0);
      const float* V = ctx.GetInput(2).GetTensorData<float>() + (qkv ? 2 * d.hidden : 0);
      const int32_t* len = ctx.GetInput(3).GetTensorData<int32_t>();
      const int32_t* rag = ctx.GetInput(4).GetTensorData<int32_t>();
      float* O = ctx.GetOutput(0, {d.tokens, d.hidden}).GetTensorMutableData<float>();
      auto in_row = [&](int64_t t) -> int64_t {  // the row of Q, K and V that token t reads
        const int64_t r = d.token_rows ? d.token_rows[t] : t;
        if (r < 0 || r >= d.in_rows) {
          ORT_CXX_API_THROW("RaggedAttention: token_rows holds a row outside Q, K and V", ORT_INVALID_ARGUMENT);
        }
        return r;
      };
      const float* qb = d.q_bias ? ctx.GetInput(7).GetTensorData<float>() : nullptr;
      std::vector<float> p, qrow(static_cast<size_t>(d.head));
      for (int64_t b = 0; b < d.rows; ++b) {
        const int64_t start = rag[b] / d.hidden, n = len[b];
        if (start < 0 || n < 0 || start + n > d.tokens) {
          ORT_CXX_API_THROW("RaggedAttention: a row runs past the tokens", ORT_INVALID_ARGUMENT);
        }
        p.resize(static_cast<size_t>(n));
        for (int64_t h = 0; h < d.heads; ++h) {
          for (int64_t i = 0; i < n; ++i) {
            const float* q = Q + in_row(start + i) * d.in_ld + h * d.head;
            if (qb != nullptr) {  // the query bias, added first
              for (int64_t c = 0; c < d.head; ++c) qrow[c] = q[c] + qb[h * d.head + c];
              q = qrow.data();
            }
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t j = 0; j < n; ++j) {
              const float* kr = K + in_row(start + j) * d.in_ld + h * d.head;
              float s = 0.0f;
              for (int64_t c = 0; c < d.head; ++c) s += q[c] * kr[c];
              p[j] = s * d.scale;
              mx = std::max(mx, p[j]);
            }
            for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
            float* o = O + (start + i) * d.hidden + h * d.head;
            for (int64_t c = 0; c < d.head; ++c) o[c] = 0.0f;
            for (int64_t j = 0; j < n; ++j) {
              const float* vr = V + in_row(start + j) * d.in_ld + h * d.head;
              for (int64_t c = 0; c < d.head; ++c) o[c] += p[j] / sum * vr[c];
            }
          }
        }
      }
    });
  }
};

using AttnCpuOp = AttnOp<AttnCpuKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>;

#if defined(CLIPTUNE_CUDA) && defined(CLIPTUNE_CUDNN)
namespace fe = cudnn_frontend;

// One cuDNN handle per stream (bound to it once), for the life of the process; libcudnn.so.9 is opened on
// first use (the process's copy where PyTorch or ONNX Runtime loaded one, else the loader's search path).
cudnnHandle_t CudnnFor(cudaStream_t stream) {
  static std::mutex mu;
  static std::map<cudaStream_t, cudnnHandle_t> by_stream;
  std::lock_guard<std::mutex> lock(mu);
  auto it = by_stream.find(stream);
  if (it != by_stream.end()) return it->second;
  if (cudnn_frontend::cudnn_dlhandle == nullptr) {
    cudnn_frontend::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
    if (cudnn_frontend::cudnn_dlhandle == nullptr) {
      const char* err = dlerror();
      ORT_CXX_API_THROW(std::string("RaggedAttention: cannot load libcudnn.so.9 (") + (err ? err : "not found") +
                            "): install cuDNN 9 (e.g. nvidia-cudnn-cu13) or put its lib folder on LD_LIBRARY_PATH",
                        ORT_RUNTIME_EXCEPTION);
    }
  }
  cudnnHandle_t h = nullptr;
  cudnnStatus_t s = cudnn_frontend::detail::create_handle(&h);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnn_frontend::detail::set_stream(h, stream);
  if (s != CUDNN_STATUS_SUCCESS) {
    ORT_CXX_API_THROW(std::string("RaggedAttention: cuDNN handle: ") + cudnn_frontend::detail::get_error_string(s),
                      ORT_RUNTIME_EXCEPTION);
  }
  by_stream[stream] = h;
  return h;
}

enum AttnUid : int64_t { kUQ = 1, kUK, kUV, kUO, kULenQ, kULenKV, kURagQ, kURagK, kURagV, kURagO };
#endif  // CLIPTUNE_CUDA && CLIPTUNE_CUDNN

#ifdef CLIPTUNE_ATTN_CUDA
struct AttnCudaKernel : AttnAttrs {
  explicit AttnCudaKernel(const OrtKernelInfo* info) : AttnAttrs(info) {}

#ifdef CLIPTUNE_CUDNN

  // The cuDNN graph of one (rows, seq) shape: BHSD dims over the packed THD tensors (stride of a token
  // heads * head, of a head `head`), one ragged offset per tensor, the padding mask from seq_len.
  std::shared_ptr<fe::graph::Graph> Build(const AttnDims& d, cudnnHandle_t handle) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    const std::vector<int64_t> dim{d.rows, d.heads, d.seq, d.head};
    const std::vector<int64_t> stride{d.seq * d.hidden, d.head, d.hidden, 1};
    auto index = [&](int64_t uid, const char* name, int64_t n) {
      return g->tensor(fe::graph::Tensor_attributes()
                           .set_name(name)
                           .set_uid(uid)
                           .set_dim({n, 1, 1, 1})
                           .set_stride({1, 1, 1, 1})
                           .set_data_type(fe::DataType_t::INT32));
    };
    auto packed = [&](int64_t uid, const char* name, int64_t rag_uid, const char* rag_name) {
      return g->tensor(fe::graph::Tensor_attributes()
                           .set_name(name)
                           .set_uid(uid)
                           .set_dim(dim)
                           .set_stride(stride)
                           .set_ragged_offset(index(rag_uid, rag_name, d.rows + 1)));
    };
    auto q = packed(kUQ, "Q", kURagQ, "ragged_q"), k = packed(kUK, "K", kURagK, "ragged_k");
    auto v = packed(kUV, "V", kURagV, "ragged_v");
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("ragged_sdpa")
                    .set_generate_stats(false)
                    .set_attn_scale(d.scale)
                    .set_padding_mask(true)
                    .set_seq_len_q(index(kULenQ, "seq_len_q", d.rows))
                    .set_seq_len_kv(index(kULenKV, "seq_len_kv", d.rows));
    auto outs = g->sdpa(q, k, v, opts);
    outs[0]->set_output(true).set_uid(kUO).set_dim(dim).set_stride(stride).set_ragged_offset(
        index(kURagO, "ragged_o", d.rows + 1));
    auto st = g->build(handle, {fe::HeurMode_t::A});
    if (st.is_bad()) {
      ORT_CXX_API_THROW("RaggedAttention: cuDNN cannot run this attention (rows " + std::to_string(d.rows) + ", seq " +
                            std::to_string(d.seq) + ", heads " + std::to_string(d.heads) + ", head " +
                            std::to_string(d.head) + "): " + st.get_message() +
                            " (needs cuDNN >= 9.1 on sm90 for the ragged layout)",
                        ORT_RUNTIME_EXCEPTION);
    }
    return g;
  }

  void RunCudnn(Ort::KernelContext& ctx, const AttnDims& d, Ort::UnownedValue& out, cudaStream_t stream) {
    cudnnHandle_t handle = CudnnFor(stream);
    std::shared_ptr<fe::graph::Graph> graph;
    {
      // one graph per (stream, shape) for the process: a session's 23 attention nodes share it (a cuDNN
      // build per node and shape would cost seconds at every new shape)
      static std::mutex cache_mu;
      static std::map<std::tuple<cudnnHandle_t, int64_t, int64_t, int64_t, int64_t, float>,
                      std::shared_ptr<fe::graph::Graph>> cache;
      std::lock_guard<std::mutex> lock(cache_mu);
      auto key = std::make_tuple(handle, d.rows, d.seq, d.heads, d.head, d.scale);
      auto it = cache.find(key);
      if (it == cache.end()) {
        if (Capturing(stream)) {
          ORT_CXX_API_THROW("RaggedAttention: a new shape while a CUDA graph is being captured",
                            ORT_RUNTIME_EXCEPTION);
        }
        it = cache.emplace(key, Build(d, handle)).first;
      }
      graph = it->second;
    }
    Workspace ws = WorkspaceFor(stream);  // FusedDense's per-stream workspace (ops on a stream run in turn)
    int64_t need = 0;
    if (graph->get_workspace_size(need).is_bad() || need > static_cast<int64_t>(ws.bytes)) {
      ORT_CXX_API_THROW("RaggedAttention: cuDNN asks for " + std::to_string(need) + " bytes of workspace, more "
                            "than the " + std::to_string(ws.bytes) + " kept per stream",
                        ORT_RUNTIME_EXCEPTION);
    }
    void* len = const_cast<void*>(ctx.GetInput(3).GetTensorRawData());
    void* rag = const_cast<void*>(ctx.GetInput(4).GetTensorRawData());
    std::unordered_map<int64_t, void*> pack{
        {kUQ, const_cast<void*>(ctx.GetInput(0).GetTensorRawData())},
        {kUK, const_cast<void*>(ctx.GetInput(1).GetTensorRawData())},
        {kUV, const_cast<void*>(ctx.GetInput(2).GetTensorRawData())},
        {kUO, out.GetTensorMutableRawData()},
        {kULenQ, len}, {kULenKV, len}, {kURagQ, rag}, {kURagK, rag}, {kURagV, rag}, {kURagO, rag}};
    auto st = graph->execute(handle, pack, ws.ptr);
    if (st.is_bad()) {
      ORT_CXX_API_THROW("RaggedAttention: cuDNN execute failed: " + st.get_message(), ORT_RUNTIME_EXCEPTION);
    }
  }
#endif  // CLIPTUNE_CUDNN

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return AsStatus([&] {
      Ort::KernelContext ctx(context);
      AttnDims d = CheckAttn(ctx, heads, scale, qkv);
      auto out = ctx.GetOutput(0, {d.tokens, d.hidden});
      if (d.tokens == 0 || d.rows == 0) return;
      auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
      if (impl >= 1) {
#ifdef CLIPTUNE_SHORT_ATTN
        const auto* base = static_cast<const uint16_t*>(ctx.GetInput(0).GetTensorRawData());  // fp16 elements
        const int rc = cliptune_short_attention(
            base, qkv ? base + d.hidden : ctx.GetInput(1).GetTensorRawData(),
            qkv ? base + 2 * d.hidden : ctx.GetInput(2).GetTensorRawData(), d.in_ld, out.GetTensorMutableRawData(),
            ctx.GetInput(3).GetTensorData<int32_t>(), ctx.GetInput(4).GetTensorData<int32_t>(),
            static_cast<int>(d.rows), static_cast<int>(d.heads), static_cast<int>(d.hidden),
            static_cast<int>(std::min<int64_t>(d.seq, INT32_MAX)), d.scale, impl == 2 ? 1 : 0, d.token_rows,
            d.q_bias ? ctx.GetInput(7).GetTensorRawData() : nullptr, stream);
        if (rc == 0) return;
        if (rc == 2) {
          ORT_CXX_API_THROW("RaggedAttention: the short-row kernel did not launch: " +
                                std::string(cudaGetErrorString(cudaGetLastError())),
                            ORT_RUNTIME_EXCEPTION);
        }
#endif
#ifdef CLIPTUNE_CUDNN
        if (qkv) {
#endif
          ORT_CXX_API_THROW("RaggedAttention: impl " + std::to_string(impl) + " runs head size 64 (got " + std::to_string(d.head) + ")" +
#ifdef CLIPTUNE_SHORT_ATTN
                                std::string(qkv ? "; cuDNN's kernel takes separate Q, K and V: export with "
                                                  "--packed-kernel cudnn"
                                                : "; this build has no cuDNN to fall back on: rebuild with "
                                                  "cuDNN's headers (cliptune build-ops)"),
#else
                                std::string(" and this build has no short-row kernel (no nvcc at build time): "
                                            "rebuild with `cliptune build-ops --variant cuda` where nvcc is found"),
#endif
                            ORT_RUNTIME_EXCEPTION);
#ifdef CLIPTUNE_CUDNN
        }
#endif
      }
      if (d.token_rows != nullptr || d.q_bias) {
        ORT_CXX_API_THROW("RaggedAttention: token_rows (7th input) and q_bias (8th) need impl 1 or 2 and head size 64 "
                          "(cuDNN's kernel reads Q, K and V as they are)",
                          ORT_INVALID_ARGUMENT);
      }
#ifdef CLIPTUNE_CUDNN
      RunCudnn(ctx, d, out, stream);  // impl 0, or impl 1 outside the short-row kernel's limits
#else
      ORT_CXX_API_THROW("RaggedAttention: impl 0 (cuDNN) needs a build with cuDNN's headers: rebuild with "
                        "`cliptune build-ops --variant cuda` where cudnn.h and cudnn_frontend.h are found",
                        ORT_RUNTIME_EXCEPTION);
#endif
    });
  }
};

using AttnCudaOp = AttnOp<AttnCudaKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>;
#endif  // CLIPTUNE_ATTN_CUDA

// ---------------------------------------------------------------------------------------- PackAdd
//
//   Y[t] = A[b, s] + P[p, s],  i = index[t], s = i % seq, b = (i / seq) % batch, p = i / (seq * batch)
//   A [batch, seq, hidden], P [pop, seq, hidden], index int64 [tokens]  ->  Y [tokens, hidden]
//
// The first packed layer's input of a "packed_host" graph: the few-shot rows' embeddings plus each candidate's
// prompt, at the real tokens only (index: the runtime's packed_token_index into the flattened
// [pop * batch * seq] sum). It replaces Add (over the whole padded [pop, batch, seq, hidden] sum) -> Flatten ->
// Gather: one pass that writes the packed rows (pack_add.cu), instead of two over the padded sum. The CPU
// build refuses an index outside the sum; the CUDA kernel writes a row of zeros for one (no read back).

constexpr const char* kPackName = "PackAdd";

struct PackDims {
  int64_t pop = 0, batch = 0, seq = 0, hidden = 0, tokens = 0;
};

PackDims CheckPack(Ort::KernelContext& ctx) {
  auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
  auto a = shape(0), p = shape(1), idx = shape(2);
  if (a.size() != 3 || p.size() != 3 || idx.size() != 1 || p[1] != a[1] || p[2] != a[2]) {
    auto str = [](const std::vector<int64_t>& v) {
      std::string out = "[";
      for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
      return out + "]";
    };
    ORT_CXX_API_THROW("PackAdd: expected A [batch, seq, hidden], P [pop, seq, hidden] (the same seq and hidden) and "
                      "index [tokens], got A " + str(a) + ", P " + str(p) + " and index " + str(idx),
                      ORT_INVALID_ARGUMENT);
  }
  PackDims d;
  d.batch = a[0];
  d.seq = a[1];
  d.hidden = a[2];
  d.pop = p[0];
  d.tokens = idx[0];
  return d;
}

template <typename Kernel, ONNXTensorElementDataType kType>
struct PackOp : OpCommon<PackOp<Kernel, kType>, Kernel, kType> {
  explicit PackOp(const char* provider) : OpCommon<PackOp<Kernel, kType>, Kernel, kType>(provider) {}
  const char* GetName() const { return kPackName; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {  // A, P; index
    return i < 2 ? kType : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
};

struct PackCpuKernel {
  explicit PackCpuKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return AsStatus([&] {
      Ort::KernelContext ctx(context);
      PackDims d = CheckPack(ctx);
      const float* A = ctx.GetInput(0).GetTensorData<float>();
      const float* P = ctx.GetInput(1).GetTensorData<float>();
      const int64_t* index = ctx.GetInput(2).GetTensorData<int64_t>();
      float* Y = ctx.GetOutput(0, {d.tokens, d.hidden}).GetTensorMutableData<float>();
      const int64_t total = d.pop * d.batch * d.seq;
      for (int64_t t = 0; t < d.tokens; ++t) {
        const int64_t i = index[t];
        if (i < 0 || i >= total) {
          ORT_CXX_API_THROW("PackAdd: index[" + std::to_string(t) + "] = " + std::to_string(i) +
                                " is not a row of the pop * batch * seq = " + std::to_string(total) + " sum",
                            ORT_INVALID_ARGUMENT);
        }
        const int64_t r = i / d.seq, s = i % d.seq, p = r / d.batch, b = r % d.batch;
        const float* ar = A + (b * d.seq + s) * d.hidden;
        const float* pr = P + (p * d.seq + s) * d.hidden;
        for (int64_t c = 0; c < d.hidden; ++c) Y[t * d.hidden + c] = ar[c] + pr[c];
      }
    });
  }
};

using PackCpuOp = PackOp<PackCpuKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>;

#ifdef CLIPTUNE_PACK_ADD
struct PackCudaKernel {
  explicit PackCudaKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return AsStatus([&] {
      Ort::KernelContext ctx(context);
      PackDims d = CheckPack(ctx);
      auto y = ctx.GetOutput(0, {d.tokens, d.hidden});
      if (d.tokens == 0 || d.hidden == 0) return;
      const int rc = cliptune_pack_add(ctx.GetInput(0).GetTensorRawData(), ctx.GetInput(1).GetTensorRawData(),
                                       ctx.GetInput(2).GetTensorData<int64_t>(), y.GetTensorMutableRawData(), d.tokens,
                                       d.pop, d.batch, d.seq, d.hidden,
                                       static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
      if (rc == 1) {
        ORT_CXX_API_THROW("PackAdd: " + std::to_string(d.tokens) + " tokens are more than one launch covers",
                          ORT_INVALID_ARGUMENT);
      }
      if (rc != 0) {
        ORT_CXX_API_THROW("PackAdd: the kernel did not launch: " + std::string(cudaGetErrorString(cudaGetLastError())),
                          ORT_RUNTIME_EXCEPTION);
      }
    });
  }
};

using PackCudaOp = PackOp<PackCudaKernel, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>;
#endif  // CLIPTUNE_PACK_ADD

// The domains handed to sessions must outlive them: kept here until the library is unloaded.
std::mutex g_domains_mu;
std::vector<Ort::CustomOpDomain>& Domains() {
  static std::vector<Ort::CustomOpDomain> domains;
  return domains;
}

}  // namespace

extern "C" {

// Which build this is: "cuda" or "cpu" (cliptune_ort/native.py checks it before registering).
const char* cliptune_ops_variant() {
#ifdef CLIPTUNE_CUDA
  return "cuda";
#else
  return "cpu";
#endif
}

// The ops this build holds (a cuda build with neither cuDNN's headers nor nvcc has no RaggedAttention).
// "RaggedAttention" carries the impls the build runs on the GPU: "RaggedAttention[cudnn,short]".
// PackAdd follows where the build has it (the CPU build; a cuda build where nvcc was found).
const char* cliptune_ops_list() {
#ifndef CLIPTUNE_CUDA
  return "FusedDense RaggedAttention PackAdd";
#else
  return "FusedDense"
#if defined(CLIPTUNE_CUDNN) && defined(CLIPTUNE_SHORT_ATTN)
         " RaggedAttention[cudnn,short]"
#elif defined(CLIPTUNE_CUDNN)
         " RaggedAttention[cudnn]"
#elif defined(CLIPTUNE_SHORT_ATTN)
         " RaggedAttention[short]"
#endif
#ifdef CLIPTUNE_PACK_ADD
         " PackAdd"
#endif
      ;
#endif
}

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than these headers: answer through the first API version
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "cliptune ops: this onnxruntime is older than the headers the library was built with; rebuild it");
  }
  Ort::InitApi(api);
  try {
#ifdef CLIPTUNE_CUDA
    static const DenseCudaOp op("CUDAExecutionProvider");
#ifdef CLIPTUNE_ATTN_CUDA
    static const AttnCudaOp attn("CUDAExecutionProvider");
#endif
#ifdef CLIPTUNE_PACK_ADD
    static const PackCudaOp pack("CUDAExecutionProvider");
#endif
#else
    static const DenseCpuOp op(nullptr);
    static const AttnCpuOp attn(nullptr);
    static const PackCpuOp pack(nullptr);
#endif
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(&op);
#if !defined(CLIPTUNE_CUDA) || defined(CLIPTUNE_ATTN_CUDA)
    domain.Add(&attn);
#endif
#if !defined(CLIPTUNE_CUDA) || defined(CLIPTUNE_PACK_ADD)
    domain.Add(&pack);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_domains_mu);
    Domains().push_back(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
}

}  // extern "C"
