"""The shared protocol: data sets, splits, fixed candidates, metrics and reports.

Every model in the project is judged by this package, so that numbers are comparable.
"""
