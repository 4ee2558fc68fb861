"""`gpu-broker simulate`: replay demand and a market through the real pool machine in
virtual time, against an oracle that knows the future (docs/simulate.md)."""
