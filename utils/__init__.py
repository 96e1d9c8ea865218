"""Library code shared by the stage scripts."""

import os

# transformers warns at import that torchvision is missing and draws a bar per weight load;
# the pipeline needs neither torchvision nor the noise. A user's own setting wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
