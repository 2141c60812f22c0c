"""Train a small decoder-only transformer with cupyflash.autodiff and AdamW, no PyTorch.

The model: token embedding (+ learned positions, or rotary q/k), N blocks of
``x += attention(rms_norm(x))`` and ``x += MLP(rms_norm(x))`` with causal
``cupyflash.flash_attention`` (or the materialised ``naive_attention`` for comparison),
a final rms_norm and a tied or untied output head. The task is generated on the fly:
a random sequence x of seqlen/2 tokens, a separator, then its copy, reversal or sorted
version; the loss and the accuracy count only the second half.

The same code runs on numpy arrays (``--device cpu``, the NumPy backend) and cupy arrays
(``--device gpu``, the CUDA kernels). It prints the loss curve, tokens per second, peak
memory and the accuracy on held-out sequences, and ``--json PATH`` writes them all.

    python examples/train_transformer.py --device cpu                       # tiny, < 1 minute
    python examples/train_transformer.py --device gpu --task copy --vocab 64 --seqlen 1024 \\
        --layers 4 --d-model 512 --heads 8 --batch 8 --pos rope --lr 2e-3 --warmup 50 \\
        --steps 800 --json gpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

try:
    import cupyflash  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import cupyflash  # noqa: F401
from cupyflash import autodiff as ad
from cupyflash.optim import AdamW, clip_grad_norm

SEP = 0          # separator token; data tokens are 1 .. vocab-1
IGNORE = -1      # target value that takes no loss


@dataclasses.dataclass
class Config:
    device: str = "cpu"          # cpu (numpy) or gpu (cupy)
    task: str = "reverse"        # copy, reverse or sort
    vocab: int = 16
    seqlen: int = 16             # model input length; the source half is seqlen // 2 tokens
    layers: int = 2
    d_model: int = 32
    heads: int = 2
    mlp_ratio: int = 4
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    attention: str = "flash"     # flash or naive
    dtype: str = "float32"       # parameters and activations
    attn_dtype: str = ""         # dtype q, k, v are cast to for attention (default: dtype)
    pos: str = "learned"         # learned absolute positions, or rope (rotary q and k)
    tie: bool = False            # output head = token embedding transposed
    checkpoint: bool = False     # recompute each block in backward (activation checkpointing)
    seed: int = 0
    eval_batches: int = 4
    log_every: int = 25
    warmup_steps_untimed: int = 3


# --------------------------------------------------------------------------- data

def make_batch(rng: np.random.Generator, cfg: Config):
    """(inputs, targets), host int32 arrays (batch, seqlen); targets are IGNORE on the source half."""
    half = cfg.seqlen // 2
    x = rng.integers(1, cfg.vocab, size=(cfg.batch, half))
    if cfg.task == "copy":
        y = x
    elif cfg.task == "reverse":
        y = x[:, ::-1]
    elif cfg.task == "sort":
        y = np.sort(x, axis=1)
    else:
        raise ValueError(f"task must be copy, reverse or sort, got {cfg.task!r}")
    seq = np.concatenate([x, np.full((cfg.batch, 1), SEP), y], axis=1)  # length seqlen + 1
    inputs, targets = seq[:, :-1].copy(), seq[:, 1:].copy()
    targets[:, :half] = IGNORE  # predicting the source half is not the task
    return inputs.astype(np.int32), targets.astype(np.int32)


# --------------------------------------------------------------------------- model

def array_module(device: str):
    if device == "gpu":
        import cupy
        return cupy
    if device == "cpu":
        return np
    raise ValueError(f"device must be cpu or gpu, got {device!r}")


def init_params(cfg: Config, xp, rng: np.random.Generator) -> dict:
    """Parameters as leaf tensors. Linear layers ~ N(0, 1/fan_in); residual outputs scaled
    down by sqrt(2 * layers) as in GPT-2."""
    d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    dtype = np.dtype(cfg.dtype)

    def normal(*shape, std):
        return ad.Tensor(xp.asarray((rng.standard_normal(shape) * std).astype(dtype)), requires_grad=True)

    def ones(n):
        return ad.Tensor(xp.ones(n, dtype=dtype), requires_grad=True)

    resid = 1.0 / math.sqrt(2 * cfg.layers)
    p = {"tok_emb": normal(cfg.vocab, d, std=1.0)}
    if cfg.pos == "learned":
        p["pos_emb"] = normal(cfg.seqlen, d, std=1.0)
    for i in range(cfg.layers):
        p[f"b{i}.norm1"] = ones(d)
        p[f"b{i}.wqkv"] = normal(d, 3 * d, std=d ** -0.5)
        p[f"b{i}.wo"] = normal(d, d, std=d ** -0.5 * resid)
        p[f"b{i}.norm2"] = ones(d)
        p[f"b{i}.w1"] = normal(d, hidden, std=d ** -0.5)
        p[f"b{i}.w2"] = normal(hidden, d, std=hidden ** -0.5 * resid)
    p["norm_f"] = ones(d)
    if not cfg.tie:
        p["head"] = normal(d, cfg.vocab, std=d ** -0.5)
    return p


def rope_tables(cfg: Config, xp):
    """cos and sin of the rotary angles, (seqlen, 1, head_dim / 2), broadcast over heads."""
    head_dim = cfg.d_model // cfg.heads
    inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(cfg.seqlen)[:, None] * inv_freq[None, :]
    dtype = np.dtype(cfg.dtype)
    return (xp.asarray(np.cos(angles)[:, None, :].astype(dtype)),
            xp.asarray(np.sin(angles)[:, None, :].astype(dtype)))


def rope(x, cos, sin):
    """Rotate pairs (x1, x2) of the head dimension by position-dependent angles, from tape ops."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return ad.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


ATTENTION = {"flash": ad.flash_attention, "naive": ad.naive_attention}


def make_block(cfg: Config, xp):
    """The transformer block as a function of (x, its weights), so it can be checkpointed."""
    attend = ATTENTION[cfg.attention]
    heads, head_dim = cfg.heads, cfg.d_model // cfg.heads
    tables = rope_tables(cfg, xp) if cfg.pos == "rope" else None
    attn_dtype = np.dtype(cfg.attn_dtype or cfg.dtype)

    def block(x, norm1, wqkv, wo, norm2, w1, w2):
        B, S, d = x.shape
        qkv = (ad.rms_norm(x, norm1) @ wqkv).reshape(B, S, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if tables is not None:
            cos, sin = tables[0][:S], tables[1][:S]
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        if attn_dtype != x.dtype:
            q, k, v = (ad.astype(t, attn_dtype) for t in (q, k, v))
        a = attend(q, k, v, causal=True)
        if attn_dtype != x.dtype:
            a = ad.astype(a, x.dtype)
        x = x + a.reshape(B, S, d) @ wo
        return x + ad.gelu(ad.rms_norm(x, norm2) @ w1) @ w2
    return block


BLOCK_WEIGHTS = ("norm1", "wqkv", "wo", "norm2", "w1", "w2")


def forward(params: dict, cfg: Config, tokens, block) -> ad.Tensor:
    """Logits (batch, seqlen, vocab) for int tokens (batch, seqlen)."""
    S = tokens.shape[1]
    x = ad.embedding(params["tok_emb"], tokens)
    if cfg.pos == "learned":
        x = x + params["pos_emb"][:S]
    for i in range(cfg.layers):
        weights = [params[f"b{i}.{name}"] for name in BLOCK_WEIGHTS]
        x = ad.checkpoint(block, x, *weights) if cfg.checkpoint else block(x, *weights)
    x = ad.rms_norm(x, params["norm_f"])
    head = params["tok_emb"].T if cfg.tie else params["head"]
    return x @ head


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak bytes allocated while active: cupy memory-pool allocations on the GPU (a
    MemoryHook), traced numpy allocations on the CPU (tracemalloc, only if ``trace_cpu``)."""

    def __init__(self, device: str, trace_cpu: bool = False):
        self.device, self.trace_cpu, self.peak = device, trace_cpu, None
        self._hook = None

    def __enter__(self):
        if self.device == "gpu":
            import cupy
            from cupy.cuda import memory_hook

            class Hook(memory_hook.MemoryHook):
                name = "cupyflash_peak"

                def __init__(self):
                    self.used = self.peak = 0

                def malloc_postprocess(self, **kw):
                    self.used += kw["mem_size"]
                    self.peak = max(self.peak, self.used)

                def free_postprocess(self, **kw):
                    self.used -= kw["mem_size"]

            cupy.cuda.Device().synchronize()
            self._hook = Hook()
            self._hook.__enter__()
        elif self.trace_cpu:
            import tracemalloc
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.__exit__(*exc)
            self.peak = self._hook.peak  # relative to entry: what was allocated inside
        elif self.trace_cpu:
            import tracemalloc
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return False


def max_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: str) -> str:
    if device == "gpu":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def synchronize(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


# --------------------------------------------------------------------------- training

def evaluate(params, cfg: Config, block, xp, rng: np.random.Generator) -> dict:
    """Token and whole-sequence accuracy on the target half of fresh sequences."""
    correct = total = seq_correct = seqs = 0
    loss_sum = 0.0
    with ad.no_grad():
        for _ in range(cfg.eval_batches):
            inputs, targets = make_batch(rng, cfg)
            logits = forward(params, cfg, xp.asarray(inputs), block)
            t = xp.asarray(targets)
            loss_sum += float(ad.cross_entropy(logits, t, ignore_index=IGNORE).item())
            pred = logits.data.argmax(axis=-1)
            mask = t != IGNORE
            hit = (pred == t) & mask
            correct += int(hit.sum())
            total += int(mask.sum())
            seq_correct += int((hit.sum(axis=1) == mask.sum(axis=1)).sum())
            seqs += targets.shape[0]
    return {"loss": loss_sum / cfg.eval_batches, "token_accuracy": correct / total,
            "sequence_accuracy": seq_correct / seqs}


def train(cfg: Config, log=print, trace_cpu_memory: bool = False) -> dict:
    """Train and evaluate; returns the results (also the JSON written by main)."""
    if cfg.seqlen < 4 or cfg.seqlen % 2:
        raise ValueError(f"seqlen must be even and >= 4, got {cfg.seqlen}")
    if cfg.d_model % cfg.heads or (cfg.d_model // cfg.heads) % 8:
        raise ValueError("d_model / heads (the head dimension) must be a multiple of 8")
    xp = array_module(cfg.device)
    init_rng = np.random.default_rng(cfg.seed)
    data_rng = np.random.default_rng(cfg.seed + 1)
    heldout_rng = np.random.default_rng(cfg.seed + 10_000)  # different sequences than training
    params = init_params(cfg, xp, init_rng)
    n_params = int(np.sum([p.size for p in params.values()]))
    block = make_block(cfg, xp)
    opt = AdamW(params.values(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    losses, timed_tokens, timed_s = [], 0, 0.0
    log(f"{device_name(cfg.device)}: {n_params / 1e6:.2f}M parameters, task {cfg.task}, "
        f"seqlen {cfg.seqlen}, {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, "
        f"attention {cfg.attention}{' + checkpoint' if cfg.checkpoint else ''}")
    t_start = time.perf_counter()
    with PeakMemory(cfg.device, trace_cpu_memory) as memory:
        for step in range(cfg.steps):
            synchronize(xp)
            t0 = time.perf_counter()
            inputs, targets = make_batch(data_rng, cfg)
            logits = forward(params, cfg, xp.asarray(inputs), block)
            loss = ad.cross_entropy(logits, xp.asarray(targets), ignore_index=IGNORE)
            del logits
            opt.zero_grad()
            loss.backward()
            if cfg.clip:
                clip_grad_norm(opt.params, cfg.clip)
            opt.lr = learning_rate(step, cfg)
            opt.step()
            losses.append(float(loss.item()))  # synchronises
            dt = time.perf_counter() - t0
            if step >= cfg.warmup_steps_untimed:
                timed_tokens += cfg.batch * cfg.seqlen
                timed_s += dt
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                rate = timed_tokens / timed_s if timed_s else float("nan")
                log(f"step {step:5d}  loss {losses[-1]:.4f}  lr {opt.lr:.2e}  {rate:,.0f} tok/s")
    train_s = time.perf_counter() - t_start
    heldout = evaluate(params, cfg, block, xp, heldout_rng)
    peak = memory.peak if memory.peak is not None else max_rss_bytes()
    result = {
        "config": dataclasses.asdict(cfg),
        "device": device_name(cfg.device),
        "parameters": n_params,
        "parameter_bytes": int(np.sum([p.data.nbytes for p in params.values()])),
        "losses": losses,
        "final_train_loss": float(np.mean(losses[-10:])),
        "tokens_per_s": timed_tokens / timed_s if timed_s else None,
        "train_seconds": train_s,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": ("cupy pool allocations during training (MemoryHook)" if cfg.device == "gpu"
                             else "traced numpy allocations (tracemalloc)" if trace_cpu_memory
                             else "process max RSS"),
        "heldout": heldout,
    }
    if cfg.device == "gpu":
        result["pool_total_bytes"] = int(xp.get_default_memory_pool().total_bytes())
    log(f"done in {train_s:.1f} s: final train loss {result['final_train_loss']:.4f}, "
        f"{result['tokens_per_s'] or float('nan'):,.0f} tokens/s, peak memory {peak / 2**20:,.1f} MiB "
        f"({result['peak_memory_kind']})")
    log(f"held-out: loss {heldout['loss']:.4f}, token accuracy {heldout['token_accuracy']:.4f}, "
        f"sequence accuracy {heldout['sequence_accuracy']:.4f}")
    return result


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default=defaults.device)
    p.add_argument("--task", choices=["copy", "reverse", "sort"], default=defaults.task)
    for name in ("vocab", "seqlen", "layers", "d_model", "heads", "batch", "steps", "warmup",
                 "seed", "eval_batches", "log_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--attention", choices=["flash", "naive"], default=defaults.attention)
    p.add_argument("--dtype", choices=["float32", "float64"], default=defaults.dtype)
    p.add_argument("--attn-dtype", choices=["", "float32", "float16", "bfloat16", "float64"], default="",
                   help="cast q, k, v to this dtype for attention (default: --dtype)")
    p.add_argument("--pos", choices=["learned", "rope"], default=defaults.pos)
    p.add_argument("--tie", action="store_true", help="tie the output head to the token embedding")
    p.add_argument("--checkpoint", action="store_true", help="recompute each block during backward")
    p.add_argument("--trace-memory", action="store_true",
                   help="CPU: measure peak numpy allocations with tracemalloc (slower)")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in vars(args).items() if k in fields})
    if cfg.attn_dtype == "bfloat16":
        from cupyflash._dtypes import BFLOAT16
        cfg.attn_dtype = str(BFLOAT16)
    return cfg, args


def write_json(path: str, result: dict) -> None:
    """Write a run's results, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def main(argv=None):
    cfg, args = parse_args(argv)
    result = train(cfg, trace_cpu_memory=args.trace_memory)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
