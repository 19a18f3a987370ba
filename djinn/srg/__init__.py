"""The semantically rich graph (DESIGN.md section 4): nodes, annotations, capture, wire form, rendering."""
from .graph import DECODE, PREFILL, Graph, Lifecycle, Node, Ref, TensorMeta, from_wire, signature

__all__ = ["Graph", "Node", "Ref", "TensorMeta", "Lifecycle", "PREFILL", "DECODE", "from_wire", "signature"]
