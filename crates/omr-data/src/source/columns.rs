//! Typed views over arrow columns, so the parquet reader handles every string/binary
//! encoding arrow may hand it (`Utf8`, `LargeUtf8`, `Utf8View`; `Binary`, `LargeBinary`,
//! `BinaryView`) with one `get(row)`.
//!
//! Which types a column may have is checked when the file is opened (`parquet.rs`); a view of
//! an unexpected type is simply absent here, which reads as null.

use crate::sample::RubricUnit;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BinaryViewArray, LargeBinaryArray, LargeStringArray, StringArray,
    StringViewArray,
};
use arrow_schema::DataType;

pub(crate) enum StrCol<'a> {
    Small(&'a StringArray),
    Large(&'a LargeStringArray),
    View(&'a StringViewArray),
}

impl<'a> StrCol<'a> {
    pub fn new(a: &'a dyn Array) -> Option<Self> {
        match a.data_type() {
            DataType::Utf8 => Some(StrCol::Small(a.as_string::<i32>())),
            DataType::LargeUtf8 => Some(StrCol::Large(a.as_string::<i64>())),
            DataType::Utf8View => Some(StrCol::View(a.as_string_view())),
            _ => None,
        }
    }

    pub fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            StrCol::Small(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

pub(crate) enum BinCol<'a> {
    Small(&'a BinaryArray),
    Large(&'a LargeBinaryArray),
    View(&'a BinaryViewArray),
}

impl<'a> BinCol<'a> {
    pub fn new(a: &'a dyn Array) -> Option<Self> {
        match a.data_type() {
            DataType::Binary => Some(BinCol::Small(a.as_binary::<i32>())),
            DataType::LargeBinary => Some(BinCol::Large(a.as_binary::<i64>())),
            DataType::BinaryView => Some(BinCol::View(a.as_binary_view())),
            _ => None,
        }
    }

    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        match self {
            BinCol::Small(a) => (!a.is_null(i)).then(|| a.value(i)),
            BinCol::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            BinCol::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// The list value of row `i` of a `List`/`LargeList` column; `None` when null or not a list.
pub(crate) fn list_values(a: &dyn Array, i: usize) -> Option<ArrayRef> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::List(_) => Some(a.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(a.as_list::<i64>().value(i)),
        _ => None,
    }
}

/// A struct array of rubric units; missing or null fields read as empty strings.
pub(crate) struct RubricCol<'a>(Option<&'a arrow_array::StructArray>);

impl<'a> RubricCol<'a> {
    pub fn new(a: &'a dyn Array) -> Self {
        RubricCol(a.as_struct_opt())
    }

    pub fn units(&self) -> Vec<RubricUnit> {
        let Some(s) = self.0 else { return Vec::new() };
        let field = |name: &str| s.column_by_name(name).and_then(|c| StrCol::new(c.as_ref()));
        let cols = crate::sample::UNIT_FIELDS.map(field);
        let get = |k: usize, i: usize| {
            cols[k]
                .as_ref()
                .and_then(|c| c.get(i))
                .unwrap_or_default()
                .to_string()
        };
        (0..s.len())
            .filter(|&i| !s.is_null(i))
            .map(|i| RubricUnit {
                unit_id: get(0, i),
                topic: get(1, i),
                claim: get(2, i),
                source_quote: get(3, i),
                importance: get(4, i),
                presence_question: get(5, i),
                correctness_question: get(6, i),
            })
            .collect()
    }
}

/// Row `i` of a string, integer or boolean column as text (tags); `None` when null.
pub(crate) fn scalar_string(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    if let Some(s) = StrCol::new(a) {
        return s.get(i).map(str::to_string);
    }
    Some(match a.data_type() {
        DataType::Boolean => a.as_boolean().value(i).to_string(),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).to_string(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).to_string(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).to_string(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).to_string(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).to_string(),
        _ => return None,
    })
}
