"""The transformers integration: the patch API (`api`), the per-layer attention (`layer`),
the per-call context (`call`), the pruned cache (`cache`), the prefill log-sum-exp capture
(`prefill_lse`), statistics (`stats`) and the model-family adapters (`models`)."""
