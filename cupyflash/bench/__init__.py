"""Benchmark machinery: cupyflash beside the peers a user would otherwise pick.

Shared by the ``cupyflash bench`` / ``check`` commands and ``bench/run_peers.py``:

- the problem (:class:`Case`) and the FLOP convention (:func:`attention_flops`);
- the variants a case asks for (:class:`Variant`: grouped-query attention, sliding window,
  softcap, ALiBi, sinks), passed to cupyflash, the reference and the peers that can do them
  (the others are skipped with the reason);
- the implementations: ``cupyflash`` and the peers ``naive`` (materialised attention in
  CuPy), ``torch-flash`` / ``torch-cudnn`` (PyTorch SDPA backends), ``jax-cudnn``
  (``jax.nn.dot_product_attention``) and ``fa4`` (FlashAttention-4, ``flash_attn.cute``).
  PyTorch, JAX and FA4 are imported only inside the peer that needs them, and only when
  that peer is asked for;
- timing (CUDA events on one stream; a host clock for JAX, which runs on its own stream),
  peak extra device memory, and the correctness gate that refuses to time a wrong result;
- the result schema and its JSON / CSV / table / plot writers.

Everything above the device layer runs on NumPy arrays too (:func:`cpu_device`, with an
injectable clock), so the machinery is tested on the CPU.

The package, one module per job: :mod:`.problem` (cases, FLOPs, variants), :mod:`.errors`,
:mod:`.timing`, :mod:`.devices` (devices and inputs), :mod:`.gate` (the correctness gate),
:mod:`.impls` (cupyflash and the peers), :mod:`.runner` and :mod:`.results` (schema, system
description, writers); their public names are re-exported here.
"""
from .problem import (  # noqa: F401
    Case, DEFAULT_HIDDEN, DEFAULT_SEQLENS, DEFAULT_TOKENS, DTYPES, FLOP_CONVENTION, MODES,
    MODE_FLOP_FACTOR, VARIANTS, Variant, alibi_slopes, attention_flops, default_shape, make_cases,
    parse_int_list, visible_pairs)
from .errors import (  # noqa: F401
    Unsupported, is_out_of_memory, short_error)
from .timing import (  # noqa: F401
    CudaEventTimer, HostTimer)
from .results import (  # noqa: F401
    DOCUMENT_FIELDS, PLOT_HINT, PlotUnavailable, RESULT_FIELDS, Result, SCHEMA, STATUSES, cache_info,
    format_comparison, format_grid, format_table, gpu_info, load_results, plot_results,
    require_matplotlib, results_document, speedup, upgrade_document, validate_document, versions,
    write_csv, write_json)
from .devices import (  # noqa: F401
    Device, Inputs, cpu_device, cuda_device, cuda_unavailable_reason, peak_memory_hook, variant_kwargs)
from .gate import (  # noqa: F401
    ATOL_FLOOR, Check, GRAD_NAMES, MAX_REFERENCE_SCORES, OUTPUT_NAMES, check_outputs)
from .impls import (  # noqa: F401
    CupyflashImpl, FA4Impl, Impl, JaxCudnnImpl, NaiveImpl, PEERS, Prepared, TorchImpl, TorchSDPAImpl,
    implementations, naive_backward, naive_forward)
from .runner import (  # noqa: F401
    run_benchmark)
