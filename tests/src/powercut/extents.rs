//! Unsynced writes of one file, as byte ranges over its durable content.

use std::collections::BTreeMap;

/// Unsynced writes of one file: non-overlapping byte ranges keyed by offset.
#[derive(Default)]
pub struct Extents {
    map: BTreeMap<u64, Vec<u8>>,
}

impl Extents {
    fn end(start: u64, v: &[u8]) -> u64 {
        start + v.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.map.values().map(|v| v.len() as u64).sum()
    }

    pub fn write(&mut self, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        let overlapping: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(s, v)| Self::end(**s, v) > off)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let Some(mut v) = self.map.remove(&s) else {
                continue;
            };
            if Self::end(s, &v) > end {
                self.map.insert(end, v[(end - s) as usize..].to_vec());
            }
            if s < off {
                v.truncate((off - s) as usize);
                self.map.insert(s, v);
            }
        }
        // Sequential writes (a WAL growing frame by frame) extend one extent.
        if let Some((s, v)) = self.map.range_mut(..off).next_back()
            && Self::end(*s, v) == off
        {
            v.extend_from_slice(data);
            return;
        }
        self.map.insert(off, data.to_vec());
    }

    pub fn truncate(&mut self, size: u64) {
        let beyond: Vec<u64> = self.map.range(size..).map(|(s, _)| *s).collect();
        for s in beyond {
            self.map.remove(&s);
        }
        if let Some((s, v)) = self.map.range_mut(..size).next_back()
            && Self::end(*s, v) > size
        {
            v.truncate((size - *s) as usize);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Vec<u8>)> {
        self.map.iter()
    }

    /// Copies the unsynced bytes that fall into `buf` (which starts at file offset `off`).
    pub fn overlay(&self, off: u64, buf: &mut [u8]) {
        let end = off + buf.len() as u64;
        for (s, v) in self
            .map
            .range(..end)
            .rev()
            .take_while(|(s, v)| Self::end(**s, v) > off)
        {
            let from = off.max(*s);
            let to = end.min(Self::end(*s, v));
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&v[(from - s) as usize..(to - s) as usize]);
        }
    }
}
