"""The face step: detect, embed and filter faces; the face models behind one interface."""
