"""The commands, side by side: each is one job the CLI dispatches to; none imports another."""
