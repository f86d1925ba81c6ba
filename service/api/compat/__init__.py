"""Compatibility route sets: one small adapter module per vendor (Respan, Devdraft, Flexprice,
SnapRefund). Each maps its vendor's parameter names onto the core ListQuery and its response
shape out of a Shape, and nothing else: no SQL of its own."""
