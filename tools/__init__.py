"""The one shared copy of what every stage needs: image io, palette, metrics, CRF, atomic writes,
logging, seeding/device, distributed helpers, poly LR and checkpoint loading."""
