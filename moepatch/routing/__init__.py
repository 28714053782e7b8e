"""Routing: the selection seam every routing override goes through, gate freezing, the routing recorder, the
load-balancing loss on the experts actually chosen, and the family-mapped training switches.

``moepatch.routing.override_selection`` (the seam) is re-exported here because routing overrides are written
against it.
"""

from moepatch.routing.seam import ExpertSelector
from moepatch.routing.seam import SelectorFactory
from moepatch.routing.seam import override_selection
from moepatch.routing.seam import route
from moepatch.routing.seam import routed_forward
from moepatch.routing.seam import seam_donor
from moepatch.routing.seam import select_topk
from moepatch.routing.seam import selection_seam_problem

__all__ = ["ExpertSelector", "SelectorFactory", "override_selection", "route", "routed_forward", "seam_donor",
           "select_topk", "selection_seam_problem"]
