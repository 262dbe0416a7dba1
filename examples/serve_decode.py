"""A decode serving loop over transformers models with the whole toolkit in one step.

Models: transformers' ``LlamaForCausalLM`` or ``Qwen2MoeForCausalLM`` built from a config with
random weights (nothing is downloaded), no KV cache: each step runs the model on a batch of
``n`` requests of one token each (input ids ``[n, 1]``), ``n`` drawn from a trace of decode
sizes with some larger prefill-sized steps mixed in. Each step:

1. the batch size ``n`` of this rank;
2. the DP vote across ranks (``coordinate_batch_across_dp_async``, started before the host
   zeroes the padding rows; ``--dp 2`` spawns two ranks, NCCL where two GPUs exist, gloo
   otherwise), agreeing on padding, graph mode, microbatching;
3. dispatch and padding by ``CudagraphDispatcher`` and replay by ``CUDAGraphRunner`` from
   persistent input buffers; the captured step forks each MoE block's shared expert onto an aux
   stream (``maybe_execute_in_parallel``) and runs the final RMSNorm as
   ``lowlevel.kernels.rms_norm``;
4. greedy sampling in CuPy (a RawKernel argmax, one block a row; ``--sampler cupy`` for
   ``cupy.argmax``) on a zero-copy ``as_cupy`` view of the logits, the
   token ids going back to torch through ``as_torch`` (into the next step's input buffer);
5. prefill-sized steps with ``--dp 2`` on GPUs are split into microbatches
   (``maybe_create_ubatch_slices``) and run by ``UBatchRunner`` (eager).

``--check`` (default with ``--tiny``) compares each replayed step's tokens with an eager run of
the same model on the same padded batch. ``--device cpu`` runs the same loop eagerly on the
CPU (no graphs, no streams, torch sampling, the Triton kernel under its interpreter): a smoke
test of the model plumbing. Run: ``python examples/serve_decode.py --model qwen2moe --tiny``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import lowlevel
from lowlevel import CudagraphDispatcher, CUDAGraphMode, CUDAGraphRunner

MODELS = ("llama", "qwen2moe")


# --- the model -----------------------------------------------------------------------------------
ONE_TOKEN_ATTENTION = "lowlevel_one_token_sdpa"


def one_token_attention() -> str:
    """The attention implementation the models use: transformers' sdpa, called without the
    mask where transformers lets us register one (``AttentionInterface``, 4.48 and later).

    Every row of a step is its own one-token sequence (no KV cache), so the all-True mask
    changes nothing. Given a mask, sdpa takes its memory-efficient kernel and repeats the
    grouped KV heads: on the H200 that kernel alone took 31% of a replayed Llama step (65 µs a
    layer at 128 rows). Without it sdpa takes its flash kernel with grouped heads. Eager and
    graphs run the same function, so the comparison between them is unchanged in kind."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return "sdpa"

    def one_token_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw: Any) -> Any:
        if query.shape[2] != 1 or key.shape[2] != 1:
            raise ValueError(f"{ONE_TOKEN_ATTENTION} is for one-token rows, got {query.shape[2]} queries and "
                             f"{key.shape[2]} keys a row")
        return sdpa_attention_forward(module, query, key, value, None, **kw)

    AttentionInterface.register(ONE_TOKEN_ATTENTION, one_token_sdpa)
    return ONE_TOKEN_ATTENTION


def model_config(kind: str, tiny: bool, experts: str) -> Any:
    """A transformers config: ``--tiny`` is 2 layers of hidden 256; otherwise a small real shape
    (Llama: hidden 2048, 8 layers; Qwen2-MoE: hidden 1024, 16 experts top-2, 4 layers)."""
    import transformers as tf

    common = dict(attn_implementation=one_token_attention(), tie_word_embeddings=False, use_cache=False)
    if kind == "llama":
        shape = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024) if tiny else
                 dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000))
        return tf.LlamaConfig(**shape, **common)
    shape = (dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  shared_expert_intermediate_size=512, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024) if tiny else
             dict(hidden_size=1024, intermediate_size=5632, moe_intermediate_size=1408,
                  shared_expert_intermediate_size=5632, num_experts=16, num_experts_per_tok=2, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000))
    # The experts' default "eager" path loops over the experts that were hit (a host sync, not
    # capturable); "batched_mm" and "grouped_mm" keep the routing on the device.
    return tf.Qwen2MoeConfig(**shape, **common, experts_implementation=experts)


def build_model(kind: str, *, tiny: bool, device: str, dtype: Any, seed: int, experts: str = "batched_mm") -> Any:
    """The model with random weights (seeded), in eval mode on ``device``."""
    import torch
    import transformers as tf

    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
    cfg = model_config(kind, tiny, experts)
    torch.manual_seed(seed)
    cls = tf.LlamaForCausalLM if kind == "llama" else tf.Qwen2MoeForCausalLM
    with torch.device(device):
        model = cls(cfg)
    model = model.to(dtype=dtype).eval()
    model.requires_grad_(False)  # inference only (microbatch threads do not inherit inference_mode)
    return model


class TritonRMSNorm:
    """Stands in for the model's final RMSNorm: ``lowlevel.kernels.rms_norm`` over the rows of
    ``[..., hidden]`` (float32 statistics, the weight applied in the input dtype)."""

    def __init__(self, norm: Any) -> None:
        from lowlevel import kernels as K

        self.K = K
        self.weight = norm.weight
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def __call__(self, x: Any) -> Any:
        shape = x.shape
        return self.K.rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)


def patch_model(model: Any, aux_stream: Any) -> dict[str, int]:
    """Swap the final RMSNorm for the Triton kernel and fork every Qwen2-MoE sparse block's shared
    expert onto ``aux_stream`` (None: in order on the current stream). Returns what was patched."""
    import torch
    import torch.nn.functional as F

    inner = model.model
    norm = TritonRMSNorm(inner.norm)
    inner.norm.forward = norm  # an instance attribute shadows the class's forward
    forked = 0
    for layer in inner.layers:
        block = getattr(layer, "mlp", None)
        if block is None or not hasattr(block, "shared_expert") or not hasattr(block, "experts"):
            continue

        def forward(hidden_states: torch.Tensor, _b: Any = block, _ev: Any = None) -> torch.Tensor:
            # Qwen2MoeSparseMoeBlock.forward (transformers 5), with the shared expert on the aux stream.
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)

            def routed() -> torch.Tensor:
                _, weights, experts = _b.gate(x)
                return _b.experts(x, experts, weights)

            def shared() -> torch.Tensor:
                return F.sigmoid(_b.shared_expert_gate(x)) * _b.shared_expert(x)

            tl = lowlevel.active_timeline()  # a Timeline is watching (never inside a capture): name the branches
            fn0, fn1 = (routed, shared) if tl is None else (_spanned(tl, "routed experts", routed),
                                                            _spanned(tl, "shared expert", shared))
            out, sh = lowlevel.maybe_execute_in_parallel(fn0, fn1, _b._ll_events[0], _b._ll_events[1], aux_stream)
            return (out + sh).reshape(b, s, h)

        block._ll_events = (lowlevel.Event(), lowlevel.Event()) if aux_stream is not None else (None, None)
        block.forward = forward
        forked += 1
    return {"final_norm": 1, "moe_blocks_forked": forked}


def _spanned(tl: Any, name: str, fn: Any) -> Any:
    def run() -> Any:
        with tl.span(name):
            return fn()
    return run


def add_layer_yields(model: Any) -> None:
    """Let microbatch threads take turns after every decoder layer (``dbo_yield``; a no-op outside
    a microbatch thread), so two microbatches' layers interleave on the compute stream."""
    for layer in model.model.layers:
        orig = layer.forward

        def forward(*a: Any, _orig: Any = orig, **kw: Any) -> Any:
            out = _orig(*a, **kw)
            lowlevel.dbo_yield()
            return out

        layer.forward = forward


def make_forward(model: Any, mask_buf: Any) -> Any:
    """``forward_logits(ids, pos) -> logits [rows, vocab] float32``: one step of ``model`` on
    ``ids`` and ``pos`` (``[rows, 1]`` int64), what a graph captures.

    The attention mask is passed ready-made (a view of ``mask_buf``, all True, ``[rows, 1, 1, 1]``):
    transformers would otherwise build one from ``position_ids``, with a host synchronisation when
    eager and a different mask when it sees a capture, so eager and replay would not compute the
    same thing."""

    def forward_logits(ids: Any, pos: Any) -> Any:
        mask = mask_buf[: ids.shape[0]]
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
        return out.logits[:, -1, :].float()

    return forward_logits


# --- the trace -----------------------------------------------------------------------------------
def make_trace(steps: int, max_batch: int, prefill_frac: float, seed: int, rank: int) -> list[int]:
    """Batch sizes per step: decode sizes in [1, max_batch]; on a share ``prefill_frac`` of the
    steps (the same steps on every rank) a prefill-sized batch in (max_batch, 3 * max_batch]."""
    rng = random.Random(seed * 1000 + rank)
    out = []
    for step in range(steps):
        if random.Random(seed * 7919 + step).random() < prefill_frac:
            out.append(rng.randint(max_batch + 1, 3 * max_batch))
        else:
            out.append(rng.randint(1, max_batch))
    return out


# --- sampling ------------------------------------------------------------------------------------
SAMPLERS = ("cupy", "cupy-kernel", "torch")
_ARGMAX_SRC = r"""
#define NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no math.h)

__device__ __forceinline__ void take(float v, int c, float& best, int& idx) {
    if (v > best || (v == best && c < idx)) { best = v; idx = c; }
}

// One block a row: each thread scans a strided share (VEC floats a load where the row allows),
// then warp shuffles and one warp across the warps' winners. Ties go to the lowest column
// (torch's and NumPy's rule).
template <int VEC>
__device__ void argmax_row(const float* x, long long ld, int cols, long long* out) {
    const float* p = x + (long long)blockIdx.x * ld;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    if (VEC == 4) {
        const float4* p4 = reinterpret_cast<const float4*>(p);
        for (int i = threadIdx.x; i < cols / 4; i += blockDim.x) {
            float4 v = p4[i];
            take(v.x, 4 * i, best, idx); take(v.y, 4 * i + 1, best, idx);
            take(v.z, 4 * i + 2, best, idx); take(v.w, 4 * i + 3, best, idx);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) take(p[c], c, best, idx);
    }
    for (int off = 16; off > 0; off >>= 1)
        take(__shfl_down_sync(0xffffffffu, best, off), __shfl_down_sync(0xffffffffu, idx, off), best, idx);
    __shared__ float sb[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sb[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? sb[lane] : NEG_INF;
        idx = lane < nw ? si[lane] : 0x7fffffff;
        for (int off = 16; off > 0; off >>= 1)
            take(__shfl_down_sync(0xffffffffu, best, off), __shfl_down_sync(0xffffffffu, idx, off), best, idx);
        if (lane == 0) out[blockIdx.x] = idx;
    }
}

extern "C" __global__ void argmax_rows_f32(const float* x, long long ld, int cols, long long* out) {
    argmax_row<1>(x, ld, cols, out);
}

extern "C" __global__ void argmax_rows_f32x4(const float* x, long long ld, int cols, long long* out) {
    argmax_row<4>(x, ld, cols, out);
}
"""
_argmax_kernels: Any = None


def argmax_rows(x: Any) -> Any:
    """Greedy token per row of float32 logits ``x`` ``[n, vocab]`` (a CuPy array whose rows are
    contiguous), as a new int64 CuPy array ``[n]``, on CuPy's current stream; 16-byte loads
    where the rows are 16-byte aligned and ``vocab % 4 == 0``. NaN rows are not handled
    (torch's argmax would pick the NaN)."""
    global _argmax_kernels
    import cupy

    if x.dtype != cupy.float32 or x.ndim != 2 or x.strides[1] != 4:
        raise ValueError(f"argmax_rows needs float32 [n, vocab] logits with contiguous rows, got {x.dtype} "
                         f"{x.shape} strides {x.strides}")
    if _argmax_kernels is None:
        mod = cupy.RawModule(code=_ARGMAX_SRC, options=("-std=c++14",))
        _argmax_kernels = (mod.get_function("argmax_rows_f32"), mod.get_function("argmax_rows_f32x4"))
    n, cols = x.shape
    out = cupy.empty(n, dtype=cupy.int64)
    if n:
        vec = cols % 4 == 0 and x.strides[0] % 16 == 0 and x.data.ptr % 16 == 0
        _argmax_kernels[vec]((n,), (512,), (x, cupy.int64(x.strides[0] // 4), cupy.int32(cols), out))
    return out


# --- DP ------------------------------------------------------------------------------------------
def dp_vote(cfg: Any, num_tokens: int, num_tokens_padded: int, mode: CUDAGraphMode) -> Any:
    """Start this step's DP vote and return at once (a :class:`lowlevel.DPVote`); its
    ``result()`` gives ``(should_ubatch, padded counts per rank, synced mode)``. The one place
    the step talks to the other ranks: the host prepares the step's inputs while it is in flight."""
    return lowlevel.coordinate_batch_across_dp_async(num_tokens, True, True, cfg, num_tokens_padded=num_tokens_padded,
                                                     uniform_decode=False, cudagraph_mode=mode)


# --- one rank ------------------------------------------------------------------------------------
def run_rank(rank: int, args: argparse.Namespace, init_file: str | None = None) -> dict[str, Any]:
    """The decode loop of one rank; returns its summary."""
    import torch

    gpu = args.device == "cuda"
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel on the CPU
    dp = args.dp
    one_gpu_each = gpu and dp > 1 and args.gpus >= dp
    if one_gpu_each:
        # Before CUDA starts in this process: it sees only its own GPU, as device 0, so every
        # thread (microbatch threads included, which start on device 0) works on the right one.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(args.gpus)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[rank]
    if gpu:
        import cupy

        torch.cuda.set_device(0)
        cupy.cuda.Device(0).use()
    group_backend = None
    if dp > 1:
        import torch.distributed as dist

        group_backend = "nccl" if one_gpu_each else "gloo"
        dist.init_process_group(group_backend, init_method=f"file://{init_file}", rank=rank, world_size=dp)
    try:
        with torch.inference_mode():
            return _loop(rank, args, gpu, group_backend)
    finally:
        if dp > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class DecodeServer:
    """One rank's serving state: the patched model, persistent input buffers, the dispatcher, the
    graph runner, the DP config and the microbatch runner. :meth:`step` serves one batch.

    ``ids_buf`` / ``pos_buf`` (``[rows, 1]`` int64) hold each request slot's last token and
    position; a step over ``n`` requests reads slots ``[0, n)`` (padded up to the graph's size),
    and writes the greedy tokens back into them."""

    def __init__(self, model: Any, *, max_batch: int, gpu: bool, rank: int = 0, dp_cfg: Any = None,
                 seed: int = 0, sampler: str = "cupy-kernel") -> None:
        import torch

        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.model, self.gpu, self.rank, self.cfg = model, gpu, rank, dp_cfg
        self.sampler = sampler if gpu else "torch"
        self.max_batch = max_batch
        device = "cuda" if gpu else "cpu"
        self.rows = rows = 3 * max_batch + 8
        gen = torch.Generator(device="cpu").manual_seed(seed + rank)
        self.ids_buf = torch.randint(0, model.config.vocab_size, (rows, 1), generator=gen).to(device)
        self.pos_buf = torch.randint(0, 512, (rows, 1), generator=gen).to(device)
        self.mask_buf = torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=device)
        self.forward_logits = make_forward(model, self.mask_buf)
        self.dispatcher = CudagraphDispatcher(max_capture_size=max_batch)
        self.dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL)
        self.views = {s: (self.ids_buf[:s], self.pos_buf[:s]) for s in range(1, rows + 1)}  # same buffers every step
        self.runner = CUDAGraphRunner(self.forward_logits, CUDAGraphMode.FULL) if gpu else None
        self.ub_runner = None
        if dp_cfg is not None and dp_cfg.enable_microbatching:
            add_layer_yields(model)
            fwd = self.forward_logits

            def ub_fn(i: int, ids: Any, pos: Any) -> Any:
                with torch.inference_mode():  # thread-local: each microbatch thread enters it
                    return fwd(ids, pos)

            self.ub_runner = lowlevel.UBatchRunner(ub_fn, mode="threads", timeout_s=60.0)
        self.capture_s = self.capture_mib = 0.0
        self.graphs = 0
        self.last: dict[str, Any] = {}

    def capture(self) -> None:
        """Capture a graph for every capture size (largest first, one shared pool)."""
        import torch

        if self.runner is None:
            return
        self.forward_logits(*self.views[self.max_batch])  # compile and allocate outside the captures
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # device memory held afterwards = what the graphs keep
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        self.graphs = self.runner.capture_all(self.dispatcher, lambda desc: self.views[desc.num_tokens],
                                              progress=False)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        torch.cuda.empty_cache()  # warm-up temporaries outside the graphs' pool
        self.capture_mib = (free0 - torch.cuda.mem_get_info()[0]) / 2**20

    def sample(self, logits: Any) -> Any:
        """Greedy tokens ``[n]`` int64: argmax in CuPy on a zero-copy view, back as a torch view
        (``sampler="cupy-kernel"``: a CuPy RawKernel, one block a row, :func:`argmax_rows`;
        ``"cupy"``: ``cupy.argmax``, about 2% slower a step; ``"torch"``: torch's argmax)."""
        if self.sampler == "torch":
            return logits.argmax(dim=-1)
        if self.sampler == "cupy-kernel":
            return lowlevel.as_torch(argmax_rows(lowlevel.as_cupy(logits)))
        import cupy

        return lowlevel.as_torch(cupy.argmax(lowlevel.as_cupy(logits), axis=1))

    def plan(self, n: int) -> tuple[CUDAGraphMode, Any, int, bool]:
        """``(mode, descriptor, padded rows, microbatch)`` for a batch of ``n`` on this rank.
        With DP, the vote is started first and the padding rows this rank needs anyway are
        zeroed while it is in flight."""
        mode, desc = self.dispatcher.dispatch(n)  # this rank's own padding and mode
        pad = desc.num_tokens
        vote = dp_vote(self.cfg, n, pad, mode) if self.cfg is not None else None
        if pad > n:
            self.ids_buf[n:pad].zero_()  # padding rows: defined contents (host work during the vote)
        if vote is None:
            return mode, desc, pad, False
        should_ubatch, counts, synced = vote.result()
        dp_pad = int(counts[self.rank])
        if dp_pad > pad:
            self.ids_buf[pad:dp_pad].zero_()  # the other ranks padded further
        pad = dp_pad
        if synced != CUDAGraphMode.FULL.value or pad > self.max_batch:
            mode = CUDAGraphMode.NONE
        elif pad != desc.num_tokens:
            mode, desc = self.dispatcher.dispatch(pad)  # the padded count is a capture size
        return mode, desc, pad, should_ubatch

    def step(self, n: int, *, write_back: bool = True) -> Any:
        """Serve one batch of ``n`` requests; returns their greedy tokens ``[n]`` (a torch tensor).
        :attr:`last` says how: ``mode``, ``pad``, ``ubatched``."""
        mode, desc, pad, should_ubatch = self.plan(n)
        ids, pos = self.views[pad]
        if mode is CUDAGraphMode.FULL and self.runner is not None:
            logits = self.runner(mode, desc, ids, pos, num_tokens=n)  # replay into static buffers
        elif should_ubatch and self.ub_runner is not None:
            _, padded_slices = lowlevel.maybe_create_ubatch_slices(True, [1] * n, pad, pad, num_ubatches=2)
            logits = self.ub_runner([ids, pos], padded_slices)
        else:
            logits = self.forward_logits(ids, pos)
        tokens = self.sample(logits[:n])
        self.last = {"mode": mode, "pad": pad, "ubatched": should_ubatch and self.ub_runner is not None}
        if write_back:
            self.advance(n, tokens)
        return tokens

    def advance(self, n: int, tokens: Any) -> None:
        """Write the step's tokens into the request slots: the next step decodes from them."""
        self.ids_buf[:n, 0].copy_(tokens)
        self.pos_buf[:n].add_(1)

    def eager_tokens(self, n: int, pad: int) -> Any:
        """Eager greedy tokens of the same padded batch (the check's reference)."""
        return self.forward_logits(*self.views[pad])[:n].argmax(dim=-1)

    def close(self) -> None:
        if self.ub_runner is not None:
            self.ub_runner.close()


def _loop(rank: int, args: argparse.Namespace, gpu: bool, group_backend: str | None) -> dict[str, Any]:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = build_model(args.model, tiny=args.tiny, device="cuda" if gpu else "cpu", dtype=dtype, seed=args.seed,
                        experts=args.experts)
    patched = patch_model(model, lowlevel.Stream() if gpu else None)
    cfg = None
    if args.dp > 1:
        cfg = lowlevel.DPConfig(args.dp, rank, enable_microbatching=gpu, prefill_token_threshold=args.max_batch + 1,
                                use_device_collective=group_backend == "nccl", timeout_s=60.0)
    srv = DecodeServer(model, max_batch=args.max_batch, gpu=gpu, rank=rank, dp_cfg=cfg, seed=args.seed,
                       sampler=args.sampler)
    srv.capture()
    trace = make_trace(args.steps, args.max_batch, args.prefill_frac, args.seed, rank)
    stats = {"steps": 0, "tokens": 0, "replayed": 0, "eager": 0, "ubatched": 0, "padded_tokens": 0,
             "checked_steps": 0, "checked_tokens": 0, "mismatched_tokens": 0, "ubatch_checked_tokens": 0,
             "ubatch_mismatched_tokens": 0}
    host_us: list[float] = []
    bar = _progress(trace, rank == 0 and not args.no_progress, f"{args.model} rank {rank}")
    if gpu:
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    for n in bar:
        t0 = time.perf_counter()
        tokens = srv.step(n, write_back=False)
        host_us.append((time.perf_counter() - t0) * 1e6)
        mode, pad, ubatched = srv.last["mode"], srv.last["pad"], srv.last["ubatched"]
        if args.check and (mode is CUDAGraphMode.FULL or ubatched):
            bad = int((srv.eager_tokens(n, pad) != tokens).sum())
            if ubatched:  # other GEMM shapes: equal up to rounding, so counted apart
                stats["ubatch_checked_tokens"] += n
                stats["ubatch_mismatched_tokens"] += bad
            else:
                stats["checked_steps"] += 1
                stats["checked_tokens"] += n
                stats["mismatched_tokens"] += bad
        srv.advance(n, tokens)
        key = "replayed" if mode is CUDAGraphMode.FULL and srv.runner is not None else (
            "ubatched" if ubatched else "eager")
        stats[key] += 1
        stats["steps"] += 1
        stats["tokens"] += n
        stats["padded_tokens"] += pad - n
    if gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    srv.close()
    return dict(stats, rank=rank, model=args.model, tiny=args.tiny, dp=args.dp, backend=group_backend or "-",
                sampler=srv.sampler,
                device=torch.cuda.get_device_name() if gpu else "cpu", wall_s=wall,
                tokens_per_s=stats["tokens"] / wall if wall else 0.0,
                host_us_median=statistics.median(host_us) if host_us else 0.0,
                capture_s=srv.capture_s, capture_mib=srv.capture_mib, graphs=srv.graphs,
                replayed_share=stats["replayed"] / max(1, stats["steps"]), patched=patched,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)


def _progress(items: list[int], show: bool, desc: str) -> Any:
    if not show:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="step", file=sys.stderr)
    except ImportError:  # pragma: no cover
        return items


def _spawned(rank: int, args: argparse.Namespace, init_file: str, queue: Any) -> None:
    queue.put(run_rank(rank, args, init_file))


def summary_table(results: list[dict[str, Any]]) -> str:
    cols = [("rank", "rank", "{}"), ("model", "model", "{}"), ("device", "device", "{}"),
            ("backend", "dp backend", "{}"), ("steps", "steps", "{}"), ("tokens", "tokens", "{}"),
            ("tokens_per_s", "tokens/s", "{:.0f}"), ("host_us_median", "host us/step", "{:.0f}"),
            ("replayed_share", "replayed", "{:.0%}"), ("ubatched", "ubatched", "{}"), ("eager", "eager", "{}"),
            ("graphs", "graphs", "{}"), ("capture_s", "capture s", "{:.2f}"), ("capture_mib", "capture MiB", "{:.0f}"),
            ("padded_tokens", "padding", "{}")]
    rows = [[h for _, h, _ in cols]] + [[f.format(r[k]) for k, _, f in cols] for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="llama")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default 200; 40 with --tiny)")
    p.add_argument("--dp", type=int, choices=(1, 2), default=1, help="data-parallel ranks (2 spawns a second process)")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 256 (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=None, help="largest captured batch (default 256; 64 with --tiny)")
    p.add_argument("--prefill-frac", type=float, default=0.1, help="share of prefill-sized steps")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--experts", choices=("batched_mm", "grouped_mm"), default=None,
                   help="transformers' MoE experts implementation (default grouped_mm; batched_mm with --tiny)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda where a GPU exists")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="compare tokens with eager's on the same padded batch (default: on with --tiny)")
    p.add_argument("--sampler", choices=SAMPLERS, default="cupy-kernel",
                   help="greedy sampling: a CuPy RawKernel argmax (default), cupy.argmax, or torch's argmax")
    p.add_argument("--json", default=None, help="write the per-rank summaries here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 40 if args.tiny else 200
    if args.max_batch is None:
        args.max_batch = 64 if args.tiny else 256
    if args.device is None:
        args.device = "cuda" if lowlevel.cuda_available() else "cpu"
    args.gpus = lowlevel.device_count() if args.device == "cuda" else 0
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.experts is None:
        args.experts = "batched_mm" if args.tiny else "grouped_mm"
    if args.check is None:
        args.check = args.tiny
    if args.steps < 1 or args.max_batch < 1 or not 0 <= args.prefill_frac <= 1:
        p.error("--steps and --max-batch must be >= 1 and --prefill-frac in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"serve_decode needs transformers ({exc}); pip install 'lowlevel-streams[examples]'")
        return 2
    if args.device == "cuda":
        lowlevel.require_cuda()
    if args.dp == 1:
        results = [run_rank(0, args)]
    else:
        import torch.multiprocessing as mp

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_spawned, args=(args, os.path.join(tmp, "rendezvous"), queue), nprocs=args.dp,
                               start_method="spawn", join=True)
        results = sorted((queue.get() for _ in range(args.dp)), key=lambda r: r["rank"])
    print(summary_table(results))
    ok = True
    for r in results:
        if args.check:
            print(f"rank {r['rank']}: check: {r['checked_steps']} graph-mode steps, {r['checked_tokens']} tokens, "
                  f"{r['mismatched_tokens']} differ from eager's greedy tokens on the same padded batch")
            if r["ubatch_checked_tokens"]:
                print(f"rank {r['rank']}: microbatched steps: {r['ubatch_mismatched_tokens']} of "
                      f"{r['ubatch_checked_tokens']} tokens differ from the whole-batch eager run")
            ok = ok and r["mismatched_tokens"] == 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.check:
        print("TOKENS MATCH EAGER" if ok else "TOKENS DIFFER FROM EAGER")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
