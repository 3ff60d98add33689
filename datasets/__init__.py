"""Dataset adapters (MMSA raw layout, segments of long videos, folder of videos) and the demo data."""
