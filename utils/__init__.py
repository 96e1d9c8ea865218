"""Library code shared by the stage scripts."""
