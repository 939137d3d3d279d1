"""Calibration: FFN inputs collected from llama.cpp, activity targets, trained predictors."""
