"""Building blocks of the semantic cache: the verifier, vector indexes and calibration.

``verifier`` rejects similar-looking pairs that ask different things, ``index`` finds the
nearest stored prompts within a scope, ``calibrate`` chooses and measures the threshold.
"""
