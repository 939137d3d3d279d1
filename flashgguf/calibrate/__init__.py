"""Calibration: FFN inputs collected from llama.cpp on calibration text, for fitting the
activity predictor (flashgguf/convert/predictor_fit.py)."""
