"""Routing models: lexical features, the task classifier, the correctness scorer, quality gates.

Everything here is pure computation over numpy; nothing does I/O except explicit load/save.
"""
