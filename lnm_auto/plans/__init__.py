"""The plans contract, below every stage: ``Plans`` and its parts, each configuration's topology and the pure
planning rule that sizes it, and the validation of every field on load. Imports neither SimpleITK, pandas nor
torch, so any stage reads plans cheaply."""
