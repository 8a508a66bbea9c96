"""Analyses over the ledger and recorded data: reports, audits, evaluation."""
