"""Studies: the scripts behind the evidence in docs/results/, kept out of the product.

Each study is a module of this package, run from the project root with ``python -m``
(``python -m studies.study recipe ...``): the project root is then first on ``sys.path``,
so ``dualstpm`` and ``studies`` import from this checkout without any path set by hand.
Results go to ``studies/results/``. See studies/README.md.
"""
