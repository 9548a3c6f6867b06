"""AECP: an open hyperconverged cloud platform.

Three or more Linux servers become an ACOS cluster that runs virtual machines (AVE) on
distributed block storage (ABS). See docs/ for the user guide and ARCHITECTURE for layers.
"""

__version__ = "0.1.0"
