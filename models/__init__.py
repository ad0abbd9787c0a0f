"""DiNAT / NAT model family as timm models: ``import dinat`` registers every variant.

``timm.create_model("dinat_mini", num_classes=10)`` etc.; see docs/models.md.
"""

if __name__ == "models":  # this folder imported by its bare name: see dinat/_bare_names.py
    from dinat._bare_names import hand_over
    hand_over(globals())

from . import dinat, dinat_s, isotropic  # noqa: F401  (registers the models)
from ._checkpoint import checkpoint_filter_fn, convert_hf_state_dict, interpolate_rpb, load_checkpoint
from .dinat import DiNAT, HierarchicalNAT
from .dinat_s import DiNATs
from .isotropic import NATIsotropic
from .layers import GlobalAttentionRPB, NATLayer, NeighborhoodAttention2d

__all__ = [
    "DiNAT", "HierarchicalNAT", "DiNATs", "NATIsotropic",
    "NeighborhoodAttention2d", "GlobalAttentionRPB", "NATLayer",
    "checkpoint_filter_fn", "convert_hf_state_dict", "interpolate_rpb", "load_checkpoint",
]
