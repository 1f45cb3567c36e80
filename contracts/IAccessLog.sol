// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/**
 * @dev An append-only log of every access to customers' data, checked against their consent.
 *
 * Each entry names a pseudonymous subject, the partner and purpose the data is for, the attribute
 * bits accessed and the request it belongs to. The contract asks the consent registry, in the same
 * transaction, whether the subject permits exactly that; a permitted entry is an access that may
 * be released, a refused one is kept as a denied attempt so that auditors see those too.
 *
 * Every entry, permitted or not, extends a running hash chain:
 * `head' = keccak256(abi.encode(head, index, subject, partner, purpose, attributes, requestId, permitted))`,
 * starting from zero. With the head and the count readable here, a copy of the log that dropped,
 * re-ordered or altered an entry no longer hashes to the head.
 */
interface IAccessLog {
    /// @dev One access to one subject's data. No personal data: `subject` is a keyed hash.
    struct Access {
        bytes32 subject;
        address partner;
        bytes32 purpose;
        uint256 attributes;
        bytes32 requestId;
    }

    /// @dev The admin, the accessor and the registry must be real accounts.
    error AccessLogZeroAddress();

    /// @dev A batch must hold at least one entry.
    error AccessLogEmptyBatch();

    /**
     * @dev Entry `index` (0-based, over the whole log) was recorded; `permitted` says whether the
     * registry allowed it at this block, and `head` is the hash chain's head after it.
     */
    event AccessRecorded(
        uint256 indexed index,
        bytes32 indexed subject,
        address indexed partner,
        bytes32 purpose,
        uint256 attributes,
        bytes32 requestId,
        bool permitted,
        bytes32 head
    );

    /**
     * @dev Records `entries` in order, each checked against the registry on its own; returns how
     * many were permitted.
     *
     * Requirements:
     * - the caller has the accessor role;
     * - `entries` is not empty.
     */
    function record(Access[] calldata entries) external returns (uint256 permitted);

    /// @dev The hash chain's head after the last entry (zero while the log is empty).
    function head() external view returns (bytes32);

    /// @dev How many entries the log holds, permitted and denied.
    function count() external view returns (uint256);

    /// @dev The consent registry entries are checked against.
    function registry() external view returns (address);
}
