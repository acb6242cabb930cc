"""migrate: move a library of adapters onto new bases, on this machine or across a Ray cluster.

A manifest lists jobs (adapter, source, target, output, refine or not). Jobs of one (source, target)
pair share one pass over the pair's bases: locally through the batch transfer, on Ray through a pair
task that fills the basis cache which the pair's job tasks then read. Every job is resumable and
independent: one that fails is listed with its error while the others finish. docs/ARCHITECTURE.md
(*Migrating a library*) has the design and how it scales.
"""
