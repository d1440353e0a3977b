"""Accelerated LIF implementations, chosen by :mod:`spiking_moe.functional.lif`; never call directly."""
