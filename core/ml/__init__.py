"""Everything that imports torch. The portal never imports this package."""
