"""The version, in a module of its own so every layer can read it without importing the
package root (which is the public API and imports from all layers)."""

__version__ = "0.1.0"
