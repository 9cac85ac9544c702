"""Integrations with third-party frameworks, each imported only when used.

``fused_ls.integrations.transformers``: Hugging Face transformers causal LMs and ``Trainer``.
"""
