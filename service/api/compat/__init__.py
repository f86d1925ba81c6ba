"""Compatibility route sets: one small module per vendor (Respan, Devdraft, Flexprice,
SnapRefund), holding its models, its adapters and its route table, and nothing else: the
handlers are the ones every dialect shares (service/api/listing.py ListAdapter,
service/api/detail.py CustomerAdapter), its filter names map onto the core's through
service/api/conditions.py, and it has no SQL of its own."""
