"""Symmetry evidence measured in zone-axis patterns: one frame (:mod:`.frame`), the zones of one
sample together (:mod:`.sample`), and what the evidence can and cannot tell apart."""
