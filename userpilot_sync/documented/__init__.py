"""Userpilot's documented files beyond the event exports (snapshots, feature tags).

Userpilot Data Sync documents, per date folder, besides one file per event type:
``all_users``/``all_companies`` (snapshots, ``snapshots.py``), ``feature_tags_breakdown``,
``feature_tags_definitions``, ``track_feature_<ID>`` and ``track_labeled_<ID>``
(``feature_tags.py``). ``state.py`` keeps the snapshots' state outside the destination;
``day.py`` computes every documented file of one day. Pure core: no Dagster.
"""
