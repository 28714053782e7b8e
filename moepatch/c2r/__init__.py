"""Collaboration-constrained routing (C2R, Zhang et al., NAACL 2025) and what feeds it.

``selection`` (the constrained top-k and its install), ``profiling`` (co-activation → ``top_t`` /
``collaborative_list``), ``matrices`` (co-activation matrix files), ``placement`` (expert-parallel groups) and
``permutation`` (renumbering a checkpoint's experts by those groups).
"""

from moepatch.c2r.selection import C2RPlan
from moepatch.c2r.selection import constrained_top_k_plus_one
from moepatch.c2r.selection import constrained_topk
from moepatch.c2r.selection import install_c2r
from moepatch.c2r.selection import plan_c2r

__all__ = ["C2RPlan", "constrained_top_k_plus_one", "constrained_topk", "install_c2r", "plan_c2r"]
