//! The Arrow schemas of what the pipeline reads and writes. `schemas/*.json` hold the same
//! schemas in a small JSON form (`{"fields": [{"name", "type", "nullable"}]}`, types as Arrow
//! prints them); a test checks the code against those files so they cannot drift.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// Columns every input record must have: an id and the encoded image. Other columns pass
/// through to the scored output unchanged.
pub fn input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
    ]))
}

/// Timestamp type of `scored_at` / `failed_at`: microseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The columns the score and flag stages append to every input record, for a model with
/// `scales` scales. General-model columns are null when no general model is configured;
/// `complexity_cond` and `combined` are null without a complexity reference (the calibration
/// file's), `combined` also without a general model. Definitions: [`crate::score`].
pub fn score_fields(scales: usize) -> Vec<Field> {
    let f = |n: String, nullable: bool| Field::new(n, DataType::Float64, nullable);
    let mut v = vec![f("log_p".into(), false), f("bpd".into(), false)];
    v.extend((0..scales).map(|k| f(format!("lp_scale_{k}"), false)));
    v.push(f("gen_log_p".into(), true));
    v.extend((0..scales).map(|k| f(format!("gen_lp_scale_{k}"), true)));
    v.push(f("llr".into(), true));
    v.extend((0..scales).map(|k| f(format!("llr_scale_{k}"), true)));
    v.extend([
        f("input_bits".into(), false),
        f("complexity".into(), false),
        f("complexity_cond".into(), true),
        f("combined".into(), true),
    ]);
    v.extend([
        Field::new("score_name", DataType::Utf8, false),
        f("score".into(), false),
        f("threshold".into(), false),
        Field::new("is_ood", DataType::Boolean, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("model_version", DataType::Utf8, true),
        Field::new("general_model_id", DataType::Utf8, true),
        Field::new("scored_at", timestamp_type(), false),
        Field::new("status", DataType::Utf8, false),
    ]);
    v
}

/// The scored record: the input's columns, then [`score_fields`].
pub fn scored_schema(input: &Schema, scales: usize) -> SchemaRef {
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(score_fields(scales));
    Arc::new(Schema::new(fields))
}

/// The dead-letter record: what failed, why, where it came from, and the original bytes.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("row_group", DataType::UInt64, true),
        Field::new("row", DataType::UInt64, false),
        Field::new("image", DataType::Binary, true),
        Field::new("failed_at", timestamp_type(), false),
    ]))
}

/// One field of the JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonField {
    /// Column name.
    pub name: String,
    /// Arrow type as Arrow prints it.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Whether nulls are allowed.
    pub nullable: bool,
}

/// The JSON form of a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchema {
    /// What the schema is.
    pub description: String,
    /// Its fields in order.
    pub fields: Vec<JsonField>,
}

impl JsonSchema {
    /// The JSON form of an Arrow schema.
    pub fn from_arrow(description: &str, s: &Schema) -> Self {
        Self {
            description: description.into(),
            fields: s
                .fields()
                .iter()
                .map(|f| JsonField {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                    nullable: f.is_nullable(),
                })
                .collect(),
        }
    }
}
