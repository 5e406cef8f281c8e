"""Data preparation: the Shapes World generator and the text, caption and conversation sources."""
