"""Example strategies written outside the ``strategies`` package (docs/custom-strategies.md).

This file makes ``examples`` a regular package: opacus installs a top-level package of the
same name, and without this file Python would import that one instead.
"""
