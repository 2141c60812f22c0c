"""The benchmark's problem: the case (shapes, dtype, the variants it asks for) and the FLOP
convention its throughput is counted in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64


MODES = ("fwd", "bwd", "fwd+bwd")
#: FLOPs of each mode as a multiple of the forward pass (flash-attn's convention)
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
FLOP_CONVENTION = ("FLOPs = 4*B*H*Sq*Sk*D forward, x2.5 backward, x3.5 fwd+bwd, "
                   "halved when causal; with a sliding window Sq*Sk is the number of visible "
                   "(query, key) pairs")
#: default sizes (flash-attn benchmark convention): batch*seqlen tokens, heads*head_dim
DEFAULT_TOKENS = 16384
DEFAULT_HIDDEN = 2048
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)

DTYPES = {"bfloat16": BFLOAT16, "float16": FLOAT16, "float32": FLOAT32, "float64": FLOAT64}


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    causal: bool = False, mode: str = "fwd", window_size=(-1, -1)) -> float:
    """FLOPs of one attention call: 4*B*H*Sq*Sk*D forward (two matmuls), x2.5 backward,
    x3.5 forward+backward, halved when causal. With a sliding window, Sq*Sk becomes the
    number of visible (query, key) pairs (causal folded in as right = 0)."""
    per_pair = 4.0 * batch * heads * head_dim * MODE_FLOP_FACTOR[mode]
    if tuple(window_size) == (-1, -1):
        return per_pair * seqlen_q * seqlen_k / (2 if causal else 1)
    return per_pair * visible_pairs(seqlen_q, seqlen_k, causal, window_size)


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window_size) -> int:
    """How many (query, key) pairs the mask lets through: row i sees keys
    i + o - left .. i + o + right, o = seqlen_k - seqlen_q (bottom-right aligned; -1 unbounded)."""
    left, right = window_size
    right = 0 if causal else right
    diag = np.arange(seqlen_q) + (seqlen_k - seqlen_q)
    first = np.maximum(diag - left, 0) if left >= 0 else np.zeros_like(diag)
    last = np.minimum(diag + right, seqlen_k - 1) if right >= 0 else np.full_like(diag, seqlen_k - 1)
    return int(np.maximum(last - first + 1, 0).sum())


def alibi_slopes(heads: int) -> np.ndarray:
    """The standard geometric ALiBi slopes 2^(-8 (h + 1) / H), float32 (H,)."""
    return (2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)).astype(np.float32)


VARIANTS = ("gqa", "window", "softcap", "alibi", "sinks")


@dataclass(frozen=True)
class Variant:
    """The attention variants a case asks for beyond plain (causal) attention."""
    kv_heads: int | None = None        # grouped-query attention; None: as many as the query heads
    window: tuple[int, int] = (-1, -1)  # sliding window (left, right), -1 unbounded
    softcap: float = 0.0               # 0: off
    alibi: bool = False                # ALiBi with alibi_slopes(heads)
    sinks: bool = False                # random float32 sink logits, one per query head

    def features(self, heads: int) -> tuple[str, ...]:
        """The VARIANTS in use with ``heads`` query heads."""
        used = (self.kv_heads not in (None, heads), tuple(self.window) != (-1, -1), self.softcap > 0,
                self.alibi, self.sinks)
        return tuple(name for name, on in zip(VARIANTS, used) if on)

    def describe(self, heads: int) -> str:
        """'' for plain attention, else e.g. 'kv_heads=2 window=8,0 softcap=5 alibi sinks'."""
        text = {"gqa": f"kv_heads={self.kv_heads}", "window": "window={},{}".format(*self.window),
                "softcap": f"softcap={self.softcap:g}", "alibi": "alibi", "sinks": "sinks"}
        return " ".join(text[f] for f in self.features(heads))


def default_shape(seqlen: int, head_dim: int, tokens: int = DEFAULT_TOKENS,
                  hidden: int = DEFAULT_HIDDEN) -> tuple[int, int]:
    """(batch, heads) with batch*seqlen = tokens and heads*head_dim = hidden (at least 1 each)."""
    return max(1, tokens // seqlen), max(1, hidden // head_dim)


@dataclass(frozen=True)
class Case:
    """One configuration to run: sizes in cupyflash's (batch, seqlen, heads, head_dim) layout."""
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str
    causal: bool
    mode: str
    variant: Variant = Variant()

    @property
    def flops(self) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen_q, self.seqlen_k,
                               self.head_dim, self.causal, self.mode, self.variant.window)

    @property
    def heads_kv(self) -> int:
        return self.variant.kv_heads or self.heads

    @property
    def features(self) -> tuple[str, ...]:
        return self.variant.features(self.heads)

    @property
    def variant_text(self) -> str:
        return self.variant.describe(self.heads)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        seq = (f"{self.seqlen_q}" if self.seqlen_q == self.seqlen_k
               else f"{self.seqlen_q}x{self.seqlen_k}")
        return " ".join(filter(None, [f"{self.mode} {self.dtype} B={self.batch} H={self.heads} S={seq} "
                                      f"D={self.head_dim}{' causal' if self.causal else ''}", self.variant_text]))


def make_cases(seqlens: Sequence[int], head_dims: Sequence[int], dtypes: Sequence[str],
               causals: Sequence[bool], modes: Sequence[str], *, batch: int | None = None,
               heads: int | None = None, seqlen_k: int | None = None,
               variant: Variant = Variant()) -> list[Case]:
    """The sweep, seqlen innermost. batch/heads default to :func:`default_shape`; every case
    gets ``variant``."""
    cases = []
    for dtype in dtypes:
        for mode in modes:
            for head_dim in head_dims:
                for causal in causals:
                    for s in seqlens:
                        b, h = default_shape(s, head_dim)
                        cases.append(Case(batch or b, heads or h, s, seqlen_k or s, head_dim,
                                          dtype, bool(causal), mode, variant))
    return cases


def parse_int_list(text: str) -> list[int]:
    """Parse "1024", "512,1024", "512:16384" (doubling) or "512:4096:512" (step).

    Raises ValueError with the rule on anything else, on non-positive values and on
    empty ranges.
    """
    values: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty item in {text!r}")
        fields = part.split(":")
        try:
            nums = [int(f) for f in fields]
        except ValueError:
            raise ValueError(f"{part!r} is not N, START:STOP (doubling) or START:STOP:STEP") from None
        if len(nums) > 3:
            raise ValueError(f"{part!r} has more than three fields; use START:STOP or START:STOP:STEP")
        if any(n <= 0 for n in nums):
            raise ValueError(f"{part!r}: values must be positive integers")
        if len(nums) == 1:
            values.append(nums[0])
            continue
        start, stop = nums[0], nums[1]
        if stop < start:
            raise ValueError(f"{part!r}: STOP must be >= START")
        if len(nums) == 2:
            n = start
            while n <= stop:
                values.append(n)
                n *= 2
        else:
            values.extend(range(start, stop + 1, nums[2]))
    return sorted(set(values))
