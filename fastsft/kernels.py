"""fastsft's Triton kernels: `fastsft.kernels`, whose code lives in `kernels/` at the top of the repo.

- `fused_cross_entropy(logits, labels, ...)`: cross-entropy with label smoothing (and optional z-loss
  and softcap), loss and gradient in one pass over the logits.
- `fused_linear_cross_entropy(hidden, weight, labels, ...)`: the same from the last hidden states and
  the lm_head, in token chunks, without ever holding the full logits.

Both take `backend="triton" | "torch" | "auto"`; `reference.py` holds the float64 definition they are
tested against.

Why a module with a `__path__` rather than `kernels/__init__.py`: a folder `kernels/` with an
`__init__.py` at the repository root is a regular package named `kernels` whenever the root is on
sys.path (`python -m pytest`, a script run from the root), and a regular package beats every other:
it shadowed the `kernels` package (Hugging Face's kernel hub) that transformers and bitsandbytes import
("cannot import name 'get_kernel' from 'kernels'"). Without an `__init__.py` the folder is at most a
namespace portion, which an installed `kernels` outranks and which transformers' `is_kernels_available`
reports as absent. This module is the package's `__init__`: its `__path__` makes `fastsft.kernels.x`
import `x.py` from that folder, at the top of the source tree (an editable install, a checkout) or
installed beside this file as `fastsft/kernels/` (a wheel: pyproject.toml maps the folder there).
"""

from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
__path__ = [
    str(p) for p in (_HERE / "kernels", _HERE.parent / "kernels") if (p / "cross_entropy.py").is_file()
][:1]

# absolute imports: this module's own package is `fastsft` (relative ones would look there)
from fastsft.kernels._triton import interpreting, triton_available  # noqa: E402
from fastsft.kernels.cross_entropy import fused_cross_entropy  # noqa: E402
from fastsft.kernels.linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402
from fastsft.kernels.memory_plan import chunk_rows  # noqa: E402
from fastsft.kernels.reference import cross_entropy_reference, linear_cross_entropy_reference  # noqa: E402

__all__ = [
    "fused_cross_entropy",
    "fused_linear_cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy_reference",
    "triton_available",
    "interpreting",
    "chunk_rows",
]
