"""A CPU decode step's 30 layers in one C++ call: the same kernels, without Python between them.

A decode step of a small model is ~10 kernel calls a layer (fused QKV linear, RoPE, cache write, paged attention,
output projection, residual + RMSNorm, gate/up linear, SwiGLU + down projection, residual + RMSNorm). Called
from Python, each costs tensor allocation, argument checks and a ctypes call, ~10-40 us on a 2-core CPU: at
batch 1 that was a quarter of SmolLM2's step. `DecodeGraph` binds the step to preallocated buffers once and
`decode_step` (below) runs the layer loop in C++, calling the very kernels the Python path calls through their
function pointers (runtime.cpu_f16w / cpu_linear, cpu_write's static_write / online_write, cpu_attention's
decode_attn), so the two paths compute the same bytes (rotated online modes: below). Python keeps the embedding
lookup and the sampling.

Per layer, buffers (B rows of the compute dtype: fp32 against fp16 weights, or bf16):
    qkv = h @ wqkv.T                           (B, (H + 2 H_kv) D)
    q, k = rope(qkv[:, :(H + H_kv) D]), v = qkv[:, (H + H_kv) D:]   (B, H, D), (B, H_kv, D)
    cache.write(k, v at slots); o = paged attention(q)               (B, H, D)
    x', h = x + o @ wo.T, rms_norm(x') * ffn_norm
    x, h = x' + swiglu(h @ w13.T) @ w2.T, rms_norm(...) * next layer's attention_norm (the last: the final norm)
then logits = h @ output.T (B, vocab). The online modes (int8 / fp8 / int4_per_token_head) write fp32 rows, and
with their Hadamard rotation R the step rotates k, v and q (x @ R) and the attention output back (o @ R.T) as
runtime.kv_cache's OnlineQuantizer does, in fp32 here (PyTorch's matmul sums in another order: the logits agree to
fp32 rounding, not bit for bit). Taken: no tensor parallelism, no biases, a static KV mode (fp16 / INT8 / FP8 with
its scales set) or an online one, at most the linear kernel's MAX_ROWS sequences (cpu_linear.max_rows() in bf16);
`DecodeGraph.build` says None otherwise and the model runs its Python step.
"""

from __future__ import annotations

import ctypes
import functools
import weakref

import torch

from runtime import cpp_build, cpu_attention, cpu_f16w, cpu_linear, cpu_write

KERNEL_SRC = r"""
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef void (*linear_fn)(const void*, const void*, void*, int64_t, int64_t, int64_t);
typedef void (*swiglu_fn)(const void*, const void*, void*, int64_t, int64_t, int64_t, void*);
typedef void (*rms_fn)(const void*, const void*, void*, int64_t, int64_t, float);
typedef void (*add_rms_fn)(const void*, const void*, const void*, void*, void*, int64_t, int64_t, float);
typedef int64_t (*rope_fn)(const void*, const void*, const int64_t*, void*, void*, int64_t, int64_t, int64_t,
                           int64_t, int64_t);
typedef void (*write_fn)(const void*, const void*, int, int64_t, int64_t, int64_t, int64_t, int64_t, int, void*,
                         void*, const int64_t*, const float*, const float*, const float*, const float*);
typedef void (*online_write_fn)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int, void*,
                                void*, void*, void*, const int64_t*, const int64_t*, const int64_t*, int64_t);
typedef int (*attn_fn)(const void*, const void*, const void*, const int32_t*, const int32_t*, const float*,
                       const float*, const float*, const float*, const void*, const void*, float, int, int, int,
                       int64_t, int64_t, int64_t, int, int, int64_t, int64_t, int, void*, int64_t*);

struct Kernels { linear_fn linear; swiglu_fn swiglu; rms_fn rms; add_rms_fn add_rms; rope_fn rope; write_fn write;
                 online_write_fn online_write; attn_fn attn; };
// static modes: ks..vz per-head parameters; online modes: k_param, v_param the per-row parameter pools
struct Layer { const void *wqkv, *wo, *w13, *w2, *ffn_norm, *next_norm; void *k_pool, *v_pool;
               const float *ks, *kz, *vs, *vz; void *k_param, *v_param; };
// write_kind: a static mode's kind 0..3 (runtime.cpu_write.STATIC_KINDS); online_mode: an online mode's
// (cpu_write.ONLINE_MODES), -1 for the static ones
struct Shape { int64_t hidden, H, Hkv, D, ffn, vocab, num_blocks, block_size, positions, attn_kind, write_kind,
               online_mode, bf16, chunk, parallel_min; float eps, softmax_scale; };
// x and x2: the residual stream (ping-pong); h: its norm; f: gate | up; act: the SwiGLU scratch; kf, vf: the online
// modes' fp32 rows to write; rotation, unrotation: R and R.T (D, D) fp32 of a rotated online mode, else null
struct Buffers { void *x, *x2, *h, *qkv, *q, *k, *v, *o, *y, *f, *act, *logits, *kf, *vf; const void *rot,
                 *first_norm, *output; const float *rotation, *unrotation; };

static inline float load_x(const void* p, int64_t i, int64_t bf16) {
  if (!bf16) return ((const float*)p)[i];
  const uint32_t b = (uint32_t)((const uint16_t*)p)[i] << 16;
  float x;
  memcpy(&x, &b, 4);
  return x;
}

static inline uint16_t to_bf16(float x) {  // round to nearest even, as torch's fp32 -> bf16 (finite x)
  uint32_t b;
  memcpy(&b, &x, 4);
  return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

// rows (n, D) of x (fp32, or bf16 when x_bf16) -> y = x @ M (fp32 products and sums), stored as fp32 or, when
// y_bf16, rounded to bf16; y may be x. M (D, D) row-major: R rotates into the stored basis, R.T back from it.
static void times_matrix(const void* x, int64_t x_bf16, int64_t n, int64_t D, const float* M, void* y,
                         int64_t y_bf16) {
  for (int64_t r = 0; r < n; ++r) {
    float row[128], acc[128];
    for (int64_t i = 0; i < D; ++i) row[i] = load_x(x, r * D + i, x_bf16), acc[i] = 0.0f;
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j < D; ++j) acc[j] += row[i] * M[i * D + j];
    for (int64_t j = 0; j < D; ++j)
      if (y_bf16) ((uint16_t*)y)[r * D + j] = to_bf16(acc[j]);
      else ((float*)y)[r * D + j] = acc[j];
  }
}

static inline double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
// timing (optional, 3 doubles): seconds added for the linear layers (SwiGLU with its down projection included), the
// paged attention and the cache writes
#define TIMED(slot, call)                          \
  do {                                             \
    const double t0_ = timing ? now() : 0.0;       \
    call;                                          \
    if (timing) timing[slot] += now() - t0_;       \
  } while (0)

// Returns 0; 1 or 2 with err as decode_attn's; 3 with err[0] = the row whose position is outside the RoPE table.
extern "C" int decode_step(const Kernels* fn, const Layer* layers, int64_t num_layers, const Shape* s,
                           const Buffers* buf, int64_t B, const int64_t* pos, const int64_t* slots,
                           const int32_t* tables, const int32_t* lengths, int64_t max_blocks,
                           const int64_t* helper, const int64_t* complete, int64_t num_complete, int64_t* err,
                           double* timing) {
  const int64_t es = s->bf16 ? 2 : 4, H = s->H, Hkv = s->Hkv, D = s->D, width = (H + 2 * Hkv) * D;
  void *x = buf->x, *x2 = buf->x2;
  fn->rms(x, buf->first_norm, buf->h, B, s->hidden, s->eps);
  for (int64_t i = 0; i < num_layers; ++i) {
    const Layer& L = layers[i];
    TIMED(0, fn->linear(buf->h, L.wqkv, buf->qkv, B, s->hidden, width));
    const int64_t bad = fn->rope(buf->qkv, buf->rot, pos, buf->q, buf->k, B, H, Hkv, D, s->positions);
    if (bad >= 0) { err[0] = bad; return 3; }
    const char* v_rows = (const char*)buf->qkv + (H + Hkv) * D * es;  // row b at b * width elements
    if (s->online_mode >= 0) {  // fp32 rows, rotated where the mode rotates (q too: the attention reads rotated keys)
      for (int64_t b = 0; b < B; ++b) {
        const char* vb = v_rows + b * width * es;
        if (buf->rotation) times_matrix(vb, s->bf16, Hkv, D, buf->rotation, (float*)buf->vf + b * Hkv * D, 0);
        else for (int64_t e = 0; e < Hkv * D; ++e) ((float*)buf->vf)[b * Hkv * D + e] = load_x(vb, e, s->bf16);
      }
      if (buf->rotation) {
        times_matrix(buf->k, s->bf16, B * Hkv, D, buf->rotation, buf->kf, 0);
        times_matrix(buf->q, s->bf16, B * H, D, buf->rotation, buf->q, s->bf16);
      } else {
        for (int64_t e = 0; e < B * Hkv * D; ++e) ((float*)buf->kf)[e] = load_x(buf->k, e, s->bf16);
      }
      TIMED(2, fn->online_write((const float*)buf->kf, (const float*)buf->vf, B, Hkv, D, s->block_size,
                                s->num_blocks, (int)s->online_mode, L.k_pool, L.v_pool, L.k_param, L.v_param, slots,
                                helper, complete, num_complete));
    } else {
      for (int64_t b = 0; b < B; ++b)
        memcpy((char*)buf->v + b * Hkv * D * es, v_rows + b * width * es, Hkv * D * es);
      TIMED(2, fn->write(buf->k, buf->v, (int)s->bf16, B, Hkv, D, s->block_size, s->num_blocks, (int)s->write_kind,
                         L.k_pool, L.v_pool, slots, L.ks, L.kz, L.vs, L.vz));
    }
    int rc;
    TIMED(1, rc = fn->attn(buf->q, L.k_pool, L.v_pool, tables, lengths, L.ks, L.kz, L.vs, L.vz, L.k_param,
                           L.v_param, s->softmax_scale, (int)B, (int)H, (int)Hkv, s->num_blocks, s->block_size,
                           max_blocks, (int)D, (int)s->attn_kind, s->chunk, s->parallel_min, (int)s->bf16, buf->o,
                           err));
    if (rc != 0) return rc;
    if (buf->unrotation) times_matrix(buf->o, s->bf16, B * H, D, buf->unrotation, buf->o, s->bf16);
    TIMED(0, fn->linear(buf->o, L.wo, buf->y, B, H * D, s->hidden));
    fn->add_rms(x, buf->y, L.ffn_norm, x2, buf->h, B, s->hidden, s->eps);
    TIMED(0, fn->linear(buf->h, L.w13, buf->f, B, s->hidden, 2 * s->ffn));
    TIMED(0, fn->swiglu(buf->f, L.w2, buf->y, B, s->ffn, s->hidden, buf->act));
    fn->add_rms(x2, buf->y, L.next_norm, x, buf->h, B, s->hidden, s->eps);  // the stream is back in x
  }
  TIMED(0, fn->linear(buf->h, buf->output, buf->logits, B, s->hidden, s->vocab));
  return 0;
}
"""

P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

# Set to a dict (tools/bench_decode.py) to accumulate each step's seconds in the linear layers, the attention and
# the cache writes under those keys.
TIMING: dict[str, float] | None = None

MATRICES = ("wqkv", "wo", "w13", "w2")  # a layer's weight matrices, in the Layer struct's order


class Kernels(ctypes.Structure):  # the C++ structs above, field for field
    _fields_ = [(name, P) for name in "linear swiglu rms add_rms rope write online_write attn".split()]


class Layer(ctypes.Structure):
    _fields_ = [
        (name, P) for name in "wqkv wo w13 w2 ffn_norm next_norm k_pool v_pool ks kz vs vz k_param v_param".split()
    ]


class Shape(ctypes.Structure):
    _fields_ = [
        (name, I64)
        for name in "hidden H Hkv D ffn vocab num_blocks block_size positions attn_kind write_kind online_mode bf16 "
        "chunk parallel_min".split()
    ] + [("eps", F32), ("softmax_scale", F32)]


class Buffers(ctypes.Structure):
    _fields_ = [
        (name, P)
        for name in "x x2 h qkv q k v o y f act logits kf vf rot first_norm output rotation unrotation".split()
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpp_build.load("decode_step", KERNEL_SRC, ["-O3", "-mavx2", "-mfma"], ("avx2", "fma"))
    if lib is not None and lib.decode_step.argtypes is None:
        lib.decode_step.restype = ctypes.c_int
        lib.decode_step.argtypes = [P] * 5 + [I64] + [P] * 4 + [I64, P, P, I64, P, P]
    return lib


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class DecodeGraph:
    """A model's decode step bound to one KV cache and up to `max_batch` sequences (see the module docstring)."""

    def __init__(self, model, cache, max_batch: int, kernels: Kernels) -> None:
        cfg, dt = model.cfg, model.dtype
        self.model, self.max_batch, self.kernels = model, max_batch, kernels
        self.cache = weakref.ref(cache)  # not a strong reference: the model keeps its graphs per live cache
        self.pools = cache.pools()  # their addresses are held: rebuilt when they change
        H, Hkv, D, hidden = model.H, model.Hkv, model.D, model.hidden
        ffn = model.layers[0]["w2"].shape[1]
        vocab = model.output.shape[0]

        def buf(*shape) -> torch.Tensor:
            return torch.empty(max_batch, *shape, dtype=dt)

        self.x, self.x2, self.h, self.y = (buf(hidden) for _ in range(4))
        self.qkv, self.q, self.k, self.v = buf((H + 2 * Hkv) * D), buf(H, D), buf(Hkv, D), buf(Hkv, D)
        self.o, self.f, self.act, self.logits = buf(H, D), buf(2 * ffn), buf(ffn), buf(vocab)
        self.kf, self.vf = (torch.empty(max_batch, Hkv, D) for _ in range(2))  # online modes: fp32 rows to write
        self.rot = torch.view_as_real(model.rotations).contiguous()  # (S, D / 2, 2) fp32 (cos, sin)
        qz = cache.quantizer
        self.layers = (Layer * len(model.layers))()
        for i, L in enumerate(model.layers):
            nxt = model.layers[i + 1]["attention_norm"] if i + 1 < len(model.layers) else model.norm
            mats = (*(L[k] for k in MATRICES), L["ffn_norm"], nxt, cache.k[i], cache.v[i])
            if qz.online:  # per-row parameter pools
                params = (None,) * 4 + (cache.k_param[i], cache.v_param[i])
            else:  # (H_kv,) fp32 per-head rows, updated in place (FP8's dynamic scales)
                params = (*qz.affine(i, "k"), *qz.affine(i, "v"), None, None)
            self.layers[i] = Layer(*(None if t is None else t.data_ptr() for t in mats + params))
        R = qz.rotation if qz.online else None
        self.rotation = None if R is None else R.contiguous()  # (D, D) fp32: rows are stored as x @ R
        self.unrotation = None if R is None else R.T.contiguous()
        self.shape = Shape(
            hidden,
            H,
            Hkv,
            D,
            ffn,
            vocab,
            cache.num_blocks,
            cache.block_size,
            self.rot.shape[0],
            cpu_attention.kernel_kind(qz.kv_dtype, cache.k[0].dtype),
            cpu_write.STATIC_KINDS.get(qz.kv_dtype, 0),
            cpu_write.ONLINE_MODES.get(qz.kv_dtype, -1),
            int(dt == torch.bfloat16),
            0,  # chunk: the attention kernel's choice
            cpu_attention.PARALLEL_MIN,
            cfg.norm_eps,
            1.0 / D**0.5,
        )
        tensors = [getattr(self, n) for n in "x x2 h qkv q k v o y f act logits kf vf rot".split()]
        tensors += [model.layers[0]["attention_norm"], model.output, self.rotation, self.unrotation]
        self.buffers = Buffers(*(None if t is None else t.data_ptr() for t in tensors))
        self.err = (ctypes.c_int64 * 3)()
        self.timing = (ctypes.c_double * 3)()

    @staticmethod
    def pending(cache) -> bool:
        """The cache's FP8 scales are still to be set from the first prompt (by the Python step's write)."""
        qz = cache.quantizer
        return getattr(qz, "dynamic", False) and not bool(qz.observed.all())

    @classmethod
    def build(cls, model, cache) -> DecodeGraph | None:
        """The graph for this model and cache, or None where the step does not fit it (the Python step runs)."""
        dt, qz = model.dtype, cache.quantizer
        if model.tp is not None or torch.device(model.device).type != "cpu" or cache.kernels is not None:
            return None
        if any(L["bqkv"] is not None or L["bo"] is not None for L in model.layers) or model.D not in (64, 128):
            return None
        if qz.kv_dtype not in cpu_write.STATIC_KINDS and qz.kv_dtype not in cpu_write.ONLINE_MODES:
            return None
        if not cache.fast_write:  # the PyTorch write asked for
            return None
        mats = [model.output] + [L[k] for L in model.layers for k in MATRICES]
        if dt == torch.float32:  # fp16 matrices in the fp16-weight kernel's panels
            ops, linear, max_rows, suffix = cpu_f16w._library(), "f16w", cpu_f16w.MAX_ROWS, "f32"
            fits = all(isinstance(w, cpu_f16w.Panels) for w in mats)
        elif dt == torch.bfloat16:
            ops, linear, max_rows, suffix = cpu_linear._library(), "bf16", cpu_linear.max_rows(), "bf16"
            fits = all(isinstance(w, torch.Tensor) and w.dtype == dt and w.is_contiguous() for w in mats)
        else:
            return None
        if not fits or model.norm.dtype != dt:
            return None
        attn, write, lib = cpu_attention.library_for(qz.kv_dtype, cache.k[0].dtype), cpu_write._library(), _library()
        if ops is None or attn is None or write is None or lib is None:
            return None
        if cpu_attention.kernel_kind(qz.kv_dtype, cache.k[0].dtype) is None:
            return None
        if not all(p.is_contiguous() for p in cache.pools()) or model.H // model.Hkv > cpu_attention.MAX_GROUP:
            return None
        kernels = Kernels(
            *(
                _address(f)
                for f in (
                    getattr(ops, f"linear_{linear}"),
                    getattr(ops, f"linear_swiglu_{linear}"),
                    getattr(ops, f"rms_norm_{suffix}"),
                    getattr(ops, f"add_rms_norm_{suffix}"),
                    getattr(ops, f"rope_qk_{suffix}"),
                    write.static_write,
                    write.online_write,
                    attn.decode_attn,
                )
            )
        )
        return cls(model, cache, max_rows, kernels)

    def bound_to(self, cache) -> bool:
        """This graph runs on this cache (its pools unchanged since it was built, its fast writes still on)."""
        if cache is not self.cache() or not cache.fast_write:
            return False
        pools = cache.pools()
        return len(pools) == len(self.pools) and all(a is b for a, b in zip(self.pools, pools, strict=True))

    def __call__(self, tokens: torch.Tensor, batch) -> torch.Tensor:
        """tokens (B,) one per sequence at positions batch.starts -> fp32 logits (B, vocab)."""
        B = tokens.shape[0]
        self.shape.parallel_min = cpu_attention.PARALLEL_MIN
        self.x[:B] = self.model.embed(tokens.view(1, B))[0]
        pos = batch.starts.to(torch.int64).contiguous()
        slots = batch.slot_mapping.to(torch.int64).contiguous()
        tables = batch.block_tables.to(torch.int32).contiguous()
        lengths = batch.lengths.to(torch.int32).contiguous()
        plan = batch.key_plan  # int4_per_token_head: where the key rows go (open rows, completed blocks)
        helper = None if plan is None else plan.helper.to(torch.int64).contiguous()
        complete = None if plan is None else plan.complete.to(torch.int64).contiguous()
        rc = _library().decode_step(
            ctypes.addressof(self.kernels),
            ctypes.addressof(self.layers),
            len(self.model.layers),
            ctypes.addressof(self.shape),
            ctypes.addressof(self.buffers),
            B,
            pos.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            lengths.data_ptr(),
            tables.shape[1],
            None if helper is None else helper.data_ptr(),
            None if complete is None else complete.data_ptr(),
            0 if complete is None else complete.shape[0],
            ctypes.addressof(self.err),
            None if TIMING is None else ctypes.addressof(self.timing),
        )
        if TIMING is not None:
            for key, seconds in zip(("linear", "attention", "cache write"), self.timing, strict=True):
                TIMING[key] = TIMING.get(key, 0.0) + seconds
            ctypes.memset(self.timing, 0, ctypes.sizeof(self.timing))
        if rc == 3:
            raise ValueError(
                f"positions outside [0, {self.rot.shape[0]}) (the rotation table): pos[{self.err[0]}] = "
                f"{int(pos[self.err[0]])}"
            )
        cpu_attention.raise_for(rc, self.err, tables.shape[1], self.shape.block_size, self.shape.num_blocks)
        return self.logits[:B].to(torch.float32, copy=True)  # a copy: the next step overwrites the buffer
