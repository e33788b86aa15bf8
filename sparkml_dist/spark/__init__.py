"""Spark layer: data preparation, pre-flight checks, barrier launch and rendezvous."""
