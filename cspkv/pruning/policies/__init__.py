"""Selection policies, one class per method; `base` states the contract and holds the registry."""

from .base import Policy, ScoreInputs, Scores, register_policy, registered_policies, resolve_policy

# Imported in the order registered_policies() lists them.
from .csp import CSP  # noqa: E402,I001
from .snapkv import SnapKV  # noqa: E402
from .h2o import H2O  # noqa: E402
from .streaming import StreamingLLM  # noqa: E402
from .random_choice import Random  # noqa: E402

__all__ = ["Policy", "ScoreInputs", "Scores", "register_policy", "registered_policies", "resolve_policy",
           "CSP", "SnapKV", "H2O", "StreamingLLM", "Random"]
