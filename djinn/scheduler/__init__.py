"""The semantic scheduler (DESIGN.md section 5): pure decisions from a view of sessions and memory.

Pure Python: nothing here imports torch or CUDA, so every policy is tested on the CPU with fake sizes
and a fake clock. `types` is what it sees and decides, `interface` the one entry point and the contract
every decision meets, `policies/` the four policies.
"""
from .interface import DecisionError, Policy, check_decision, check_view, schedule
from .policies import POLICIES, get_policy
from .types import Action, Decision, MemoryView, Reason, SessionState, SessionView, View

__all__ = ["Action", "Decision", "DecisionError", "MemoryView", "POLICIES", "Policy", "Reason",
           "SessionState", "SessionView", "View", "check_decision", "check_view", "get_policy", "schedule"]
